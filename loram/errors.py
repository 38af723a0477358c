"""User-facing errors: the CLI prints these as one line and exits 2, without a traceback."""

from __future__ import annotations


class LoramError(Exception):
    """A problem with the user's input, files or environment (not a bug in loram)."""


class ArtifactError(LoramError):
    """An artifact (model dir, adapter, checkpoint, manifest) is missing, truncated or foreign."""
