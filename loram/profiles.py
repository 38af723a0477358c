"""Params profiles: YAML overlays deep-merged into params.yaml (validated before writing)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from loram.config import ParamsError, parse_params


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on top of ``base``: mappings merge recursively, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_profile(
    profile: str | Path, params: str | Path = "params.yaml", write: bool = True
) -> dict:
    """Merge ``profile`` into ``params``; validate the result; write it back unless ``write`` is False."""
    profile, params = Path(profile), Path(params)
    for p in (profile, params):
        if not p.is_file():
            raise ParamsError(f"{p} does not exist")
    raw = yaml.safe_load(params.read_text()) or {}
    overlay = yaml.safe_load(profile.read_text()) or {}
    if not isinstance(overlay, dict):
        raise ParamsError(f"profile {profile} must be a mapping of params sections")
    merged = deep_merge(raw, overlay)
    parse_params(merged)  # every key checked before anything is written
    if write:
        from loram.fsio import atomic_write_text

        atomic_write_text(params, yaml.safe_dump(merged, sort_keys=False, default_flow_style=None))
    return merged


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "profile",
        help="Deep-merge a params profile (e.g. profiles/paper.yaml) into params.yaml",
        description="Deep-merge a params profile into params.yaml after validating the result.",
    )
    sp.add_argument("profile", help="profile YAML, e.g. profiles/paper.yaml")
    sp.add_argument("--params", default="params.yaml")
    sp.add_argument("--check", action="store_true", help="validate only; do not write")

    def run(a) -> int:
        merged = apply_profile(a.profile, a.params, write=not a.check)
        verb = "valid" if a.check else "applied to " + a.params
        print(f"profile {a.profile}: {verb} (base.model = {merged.get('base', {}).get('model')})")
        return 0

    sp.set_defaults(func=run)
