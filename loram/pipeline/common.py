"""Small helpers shared by the stage modules: logging, metrics files, input checks."""

from __future__ import annotations

import logging
from pathlib import Path

from loram.errors import ArtifactError
from loram.fsio import (
    atomic_write_json,
    check_output_dir,
    check_output_file,
    read_json_object,
)

log = logging.getLogger("loram")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_metrics(path: str | Path, obj: dict, option: str = "--metrics") -> None:
    atomic_write_json(check_output_file(path, (".json",), option), obj)
    log.info("wrote %s", path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the stage that produces it first")
    return read_json_object(path, "re-run the stage that makes it")


def need_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(
            f"{what} {str(path)!r} does not exist; run the stage that makes it (or `dvc checkout`)"
        )
    return p


def need_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not str(path) or not p.is_dir():
        raise ArtifactError(f"{what} directory {str(path)!r} does not exist")
    return p


def check_outputs(
    command: str,
    out: str | Path | None = None,
    inputs=(),
    metrics: str | Path | None = None,
    plots: str | Path | None = None,
) -> None:
    """Cheap checks before any heavy work: the output paths may be written."""
    if out is not None:
        check_output_dir(out, command, inputs)
    if metrics:
        check_output_file(metrics, (".json",), "--metrics")
    if plots:
        check_output_file(plots, (".csv",), "--plots")


# A stage that was switched off (baselines.lora_full) still writes its outputs, so DVC caches the
# decision: the output directory holds only this file, and each later stage passes it on.
SKIPPED = "loram_skipped.json"


def skipped_reason(directory: str | Path) -> str | None:
    """Why the stage that wrote ``directory`` did not run (its :data:`SKIPPED` file), or None."""
    marker = Path(directory) / SKIPPED
    if not marker.is_file():
        return None
    return str(read_json_object(marker, "re-run the stage that makes it").get("reason", "?"))


def write_skipped(out: str | Path, command: str, reason: str, inputs=()) -> None:
    """``out`` as a directory holding only the :data:`SKIPPED` record, atomically."""
    from loram.fsio import atomic_dir, dumps

    with atomic_dir(out, command, inputs) as tmp:
        (tmp / SKIPPED).write_text(dumps({"reason": reason}), encoding="utf-8")
    log.info("%s: not run (%s); wrote %s", command, reason, out)
