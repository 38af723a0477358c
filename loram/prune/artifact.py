"""The pruned-model directory: safetensors with the smaller shapes + original config + manifest.

Layout::

    out_dir/
      config.json              the ORIGINAL model config (shapes come from the manifest)
      model.safetensors        weights with the pruned shapes (tied weights stored once)
      generation_config.json   as transformers writes it
      loram_manifest.json      what was kept (see loram.prune.structured)
      tokenizer files          if a tokenizer was given

``load_pruned`` rebuilds the model from this directory alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from loram.errors import ArtifactError
from loram.fsio import atomic_dir, dumps
from loram.prune.structured import ManifestError, apply_structure, check_manifest, module_indices

MANIFEST_NAME = "loram_manifest.json"

__all__ = [
    "MANIFEST_NAME",
    "load_pruned",
    "load_safetensors_dir",
    "read_manifest",
    "save_pruned",
    "structure_digest",
]

# Manifest keys that describe what happened after pruning (alignment, measured sparsity), not
# which weights were kept: they do not enter the structure digest.
_NOT_STRUCTURE = ("aligned", "sparsity")


def structure_digest(path: str | os.PathLike) -> str:
    """Identity of a pruned model's structure: its manifest (without alignment records) and
    the bytes of its masks file. An adapter records the digest of the model it was trained on;
    ``recover`` and ``merge`` refuse a pruned directory with another digest."""
    import hashlib

    d = Path(path)
    manifest = read_manifest(d)
    core = {k: v for k, v in manifest.items() if k not in _NOT_STRUCTURE}
    h = hashlib.sha256(dumps(core, indent=None).encode())
    if manifest.get("masks_file"):
        masks = d / manifest["masks_file"]
        if not masks.is_file():
            raise ArtifactError(f"{masks} (named by the manifest) does not exist")
        with open(masks, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_manifest(path: str | os.PathLike, config: Any = None) -> dict:
    """Read and validate ``loram_manifest.json`` from a pruned-model dir (or the file itself).

    With ``config`` the manifest is also checked against that model (both values named).
    """
    return check_manifest(_read_json(path), config)


def _read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {p}: not a LoRAM pruned-model directory "
            "(expected the output of save_pruned)"
        )
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p} is not valid JSON: {e}") from e


def _check_pruned_shapes(model: nn.Module, manifest: Mapping) -> None:
    """Every pruned module must already have the manifest's shape."""
    for path, (axis, idx) in module_indices(manifest, model.config).items():
        w = model.get_submodule(path).weight
        dim = 0 if axis == "out" else 1
        if w.shape[dim] != len(idx):
            raise ValueError(
                f"{path} has shape {tuple(w.shape)} but the manifest keeps {len(idx)} "
                f"{'rows' if dim == 0 else 'columns'}: the model is not pruned as the manifest says"
            )


def save_pruned(
    model: nn.Module,
    manifest: Mapping,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    command: str = "prune",
    inputs=(),
    extra_files: Mapping[str, Any] | None = None,
) -> Path:
    """Write a pruned model (smaller shapes), its original config and manifest, atomically.

    ``extra_files``: name -> callable(path) writing further files (e.g. the masks) into the
    same atomic directory.
    """
    check_manifest(manifest, model.config)
    _check_pruned_shapes(model, manifest)
    with atomic_dir(out_dir, command, inputs) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        for name, write in (extra_files or {}).items():
            write(tmp / name)
    return Path(out_dir)


def load_safetensors_dir(path: str | os.PathLike, prefix: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of ``{prefix}.safetensors`` or of its shards listed in the ``.index.json``."""
    from loram.models import RESTORE_HINT, check_safetensors, weight_files

    d = Path(path)
    files = weight_files(d, prefix)
    if not files:
        raise ArtifactError(f"no {prefix}.safetensors (or sharded index) in {d}; {RESTORE_HINT}")
    for f in files:
        check_safetensors(f)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def _load_strict(
    model: nn.Module, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, where: str
) -> None:
    """Assign ``sd`` into a meta-initialized ``model``; every key and shape must fit exactly."""
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ValueError(f"{where}: unexpected weights not in the model: {unexpected[:10]}")
    for k, t in sd.items():
        want = tuple(expected[k].shape)
        if tuple(t.shape) != want:
            raise ValueError(
                f"{where}: weight {k} has shape {tuple(t.shape)} in the file but the model "
                f"(config + manifest) expects {want}"
            )
    # Tied parameters (e.g. lm_head <- embed_tokens) are stored once. Meta init does not tie
    # them by identity, so also use transformers' declared ties (which follow the config).
    tied: dict[str, str] = {}
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        stored = [n for n in names if n in sd]
        tied.update({n: stored[0] for n in names if stored and n not in sd})
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target not in sd and source in sd:
            tied[target] = source
    missing = [k for k in expected if k not in sd and k not in tied]
    if missing:
        raise ValueError(f"{where}: weights missing from the file: {missing[:10]}")
    model.load_state_dict(
        {k: t.to(dtype) if t.is_floating_point() else t for k, t in sd.items()},
        strict=False,
        assign=True,
    )
    for target, source in tied.items():
        if target in sd:
            continue
        parent, _, attr = target.rpartition(".")
        setattr(model.get_submodule(parent), attr, model.get_parameter(source))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{where}: tensors left uninitialized after loading: {left[:10]}")


def load_pruned(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """Rebuild a pruned model from its directory alone: config -> model -> resize -> weights.

    ``dtype``: None = the dtype the directory was saved in (``loram.models.artifact_dtype``).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from loram.models import artifact_dtype, load_config

    d = Path(path)
    if not d.is_dir():
        raise ArtifactError(f"pruned model directory {str(path)!r} does not exist")
    raw = _read_json(d)
    if dtype is None:
        dtype = artifact_dtype(d)
    config = load_config(d)
    manifest = check_manifest(raw, config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_structure(model, manifest)
    _load_strict(model, load_safetensors_dir(d), dtype, where=str(d))
    return model.to(device).eval(), manifest


def load_pruned_with_masks(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """``(model, manifest, masks)`` of a pruned directory; ``masks`` is None unless sparse.

    ``dtype``: None = the directory's own dtype."""
    model, manifest = load_pruned(path, dtype=dtype)
    masks = None
    if manifest.get("masks_file"):
        from loram.prune.masks import load_masks

        masks = load_masks(Path(path) / manifest["masks_file"])
    return model, manifest, masks
