"""Recover a LoRA adapter trained on a pruned model to the original model's shapes.

Works on peft adapter state dicts as ``PeftModel.save_pretrained`` writes them (peft 0.21:
``base_model.model.model.layers.4.self_attn.q_proj.lora_A.weight``, no adapter name; a live
model's ``...lora_A.default.weight`` is accepted too). For every pruned projection:

* q/k/v/gate/up (rows pruned): ``lora_B`` (out, r) is scattered into zeros of the original
  ``(out, r)`` at the kept rows (as is a ``lora_B.bias``); ``lora_A`` is unchanged.
* o/down (columns pruned): ``lora_A`` (r, in) is scattered into zeros of the original
  ``(r, in)`` at the kept columns; ``lora_B`` is unchanged.

Everything else (unpruned layers, lm_head LoRA, modules_to_save, ...) is copied, except
``*.base_layer.*`` base weights peft stores when lm_head/embeddings are targets (dropped by
default, see ``recover_state_dict``). Then ΔW = B·A is exactly zero on
every pruned row and column. ``norm_a=True`` (the reference's "normA") fills the pruned
columns of o/down ``lora_A`` with N(0, 1/r) samples instead; ΔW is then NOT zero on those
columns of o/down (B·A picks them up), which changes the merged model where the pruned model
had no weights at all.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loram.errors import ArtifactError
from loram.fsio import atomic_dir, dumps, read_json_object
from loram.models import check_adapter_dir
from loram.prune.artifact import MANIFEST_NAME, read_manifest, structure_digest
from loram.prune.common import module_path
from loram.prune.structured import (
    STRUCTURED_METHODS,
    check_manifest,
    geometry,
    module_indices,
    original_shapes,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PROVENANCE = "loram_train.json"
"""Written by ``train`` into the adapter dir: the arm, the settings and, for an adapter trained
on a pruned model, the structure digest of that model (``trained_on.structure``)."""


def read_provenance(adapter_dir: str | os.PathLike) -> dict | None:
    """The adapter's ``loram_train.json``, or None for an adapter made elsewhere."""
    f = Path(adapter_dir) / PROVENANCE
    if not f.is_file():
        return None
    return read_json_object(f)


def check_provenance(adapter_dir, pruned_dir, *, recovered: bool) -> None:
    """Refuse an adapter that was not trained on (``recovered=False``) or recovered against
    (``recovered=True``) the pruned model in ``pruned_dir``; both are named in the error."""
    prov = read_provenance(adapter_dir)
    if prov is None:
        log.warning(
            "%s has no %s (an adapter made outside loram): cannot check which pruned model it "
            "was trained on; only its shapes are checked",
            adapter_dir,
            PROVENANCE,
        )
        return
    want = structure_digest(pruned_dir)
    if recovered:
        got = (prov.get("recovered") or {}).get("structure")
        if got is None:
            return
        trained = (prov.get("recovered") or {}).get("pruned_dir", "?")
    else:
        if prov.get("recovered"):
            raise ArtifactError(
                f"adapter {str(adapter_dir)!r} is already recovered to the original shapes; "
                "merge it instead of recovering it again"
            )
        if not prov.get("pruned", (prov.get("trained_on") or {}).get("structure")):
            raise ArtifactError(
                f"adapter {str(adapter_dir)!r} was trained on an unpruned model; there is nothing "
                "to recover (merge it directly)"
            )
        got = (prov.get("trained_on") or {}).get("structure")
        trained = (prov.get("trained_on") or {}).get("model_dir", "?")
        if got is None:
            log.warning("%s records no structure digest; only shapes are checked", adapter_dir)
            return
    if got != want:
        raise ArtifactError(
            f"adapter {str(adapter_dir)!r} was trained on the pruned model {trained!r} (structure "
            f"{got}), but {str(pruned_dir)!r} has structure {want}: a different pruning "
            "(method, criterion, ratio or seed); recover against the model it was trained on"
        )


__all__ = ["check_provenance", "read_provenance", "recover_adapter", "recover_state_dict"]

log = logging.getLogger(__name__)

# <prefix>.layers.<i>.<self_attn|mlp>.<proj>.<lora_A|lora_B>[.<adapter>].<weight|bias>
_KEY = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>\w+_proj)"
    r"\.(?P<rest>.+)$"
)
_LORA = re.compile(r"^(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.(?P<param>weight|bias)$")


def _shape_error(key: str, got: tuple, want: tuple, why: str) -> ValueError:
    return ValueError(
        f"adapter tensor {key} has shape {got} but the pruning manifest implies {want} ({why}); "
        "was this adapter trained on the model this manifest describes?"
    )


def recover_state_dict(
    pruned_sd: Mapping[str, torch.Tensor],
    manifest: Mapping,
    config: Any = None,
    norm_a: bool = False,
    seed: int = 0,
    keep_base_weights: bool = False,
) -> dict[str, torch.Tensor]:
    """Map a pruned model's LoRA state dict to the original shapes (see module docstring).

    ``config`` (the original model config) is checked against the manifest when given; the
    geometry otherwise comes from the manifest. Sparse manifests: returns a copy of the LoRA
    tensors. ``*.base_layer.*`` tensors (the base weights peft saves when ``lm_head`` or an
    embedding is a LoRA target) are dropped unless ``keep_base_weights``: they belong to the
    pruned (possibly aligned) model and would overwrite the original's own weights on load.
    """
    check_manifest(manifest, config)
    if not keep_base_weights:
        pruned_sd = {k: v for k, v in pruned_sd.items() if ".base_layer." not in k}
    if manifest["method"] not in STRUCTURED_METHODS:
        return {k: v.clone() for k, v in pruned_sd.items()}
    geom = geometry(config) if config is not None else manifest["geometry"]
    indices = module_indices(manifest, config)
    shapes = original_shapes(geom)
    gen = torch.Generator().manual_seed(seed)

    out: dict[str, torch.Tensor] = {}
    for key in sorted(pruned_sd):
        t = pruned_sd[key]
        m = _KEY.search(key)
        path = module_path(int(m["layer"]), m["proj"]) if m else None
        if path not in indices:
            out[key] = t.clone()
            continue
        axis, idx = indices[path]
        lora = _LORA.match(m["rest"])
        if lora is None:
            raise ValueError(
                f"adapter tensor {key} belongs to pruned module {path} but is not a plain LoRA "
                "lora_A/lora_B weight (DoRA and other variants cannot be recovered)"
            )
        n_out, n_in = shapes[m["proj"]]
        kind, param = lora["kind"], lora["param"]
        got = tuple(t.shape)
        if kind == "lora_A" and param == "weight":  # (r, in)
            r = t.shape[0]
            if axis == "in":
                if t.ndim != 2 or t.shape[1] != len(idx):
                    raise _shape_error(key, got, (r, len(idx)), f"{len(idx)} kept input columns")
                if norm_a:
                    fill = torch.randn(r, n_in, generator=gen) / r**0.5
                    full = fill.to(t.dtype)
                else:
                    full = t.new_zeros(r, n_in)
                full[:, idx] = t
            else:
                if t.ndim != 2 or t.shape[1] != n_in:
                    raise _shape_error(key, got, (r, n_in), "input dim is not pruned")
                full = t.clone()
        elif kind == "lora_B":  # weight (out, r) or bias (out,)
            want_out = len(idx) if axis == "out" else n_out
            if (
                t.ndim not in (1, 2)
                or t.shape[0] != want_out
                or (param == "weight") != (t.ndim == 2)
            ):
                want = (want_out, *t.shape[1:])
                raise _shape_error(key, got, want, f"{want_out} output rows")
            if axis == "out":
                full = t.new_zeros(n_out, *t.shape[1:])
                full[idx] = t
            else:
                full = t.clone()
        else:
            raise ValueError(f"adapter tensor {key}: lora_A has no bias in peft LoRA")
        out[key] = full
    return out


def _resolve_manifest(manifest_or_dir: Mapping | str | os.PathLike) -> tuple[dict, Any]:
    """A manifest dict, or a pruned-model dir / manifest file (then with its config)."""
    if isinstance(manifest_or_dir, Mapping):
        return check_manifest(manifest_or_dir), None
    p = Path(manifest_or_dir)
    config = None
    d = p if p.is_dir() else p.parent
    if (d / "config.json").is_file() and (d / MANIFEST_NAME).is_file():
        from loram.models import load_config

        config = load_config(d)
    return read_manifest(p, config), config


def recover_adapter(
    pruned_adapter_dir: str | os.PathLike,
    manifest_or_pruned_dir: Mapping | str | os.PathLike,
    out_dir: str | os.PathLike,
    base_model_path: str | None = None,
    norm_a: bool = False,
    seed: int = 0,
    keep_base_weights: bool = False,
) -> Path:
    """Write a standard peft adapter dir with the original shapes (atomically).

    ``base_model_path`` (the original model) is recorded in ``adapter_config.json`` and, if it
    is a local directory, its config is checked against the manifest.
    """
    src = Path(pruned_adapter_dir)
    adapter_cfg = check_adapter_dir(src)
    manifest, config = _resolve_manifest(manifest_or_pruned_dir)
    if not isinstance(manifest_or_pruned_dir, Mapping):
        check_provenance(src, manifest_or_pruned_dir, recovered=False)
    if base_model_path is not None and (Path(base_model_path) / "config.json").is_file():
        from loram.models import load_config

        config = load_config(base_model_path)
    if config is not None:
        check_manifest(manifest, config)

    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{src}: peft_type = {adapter_cfg.get('peft_type')!r}; only LoRA is recoverable"
        )
    if manifest["method"] in STRUCTURED_METHODS and adapter_cfg.get("use_dora"):
        raise ValueError(f"{src}: DoRA adapters cannot be recovered to the original shapes")
    if base_model_path is not None:
        adapter_cfg["base_model_name_or_path"] = str(base_model_path)

    from safetensors import safe_open

    with safe_open(str(src / ADAPTER_WEIGHTS), framework="pt") as fh:
        metadata = fh.metadata() or {"format": "pt"}
    sd = recover_state_dict(
        load_file(str(src / ADAPTER_WEIGHTS)), manifest, config, norm_a, seed, keep_base_weights
    )

    prov = read_provenance(src)
    inputs = [src, base_model_path]
    if not isinstance(manifest_or_pruned_dir, Mapping):
        inputs.append(manifest_or_pruned_dir)
    with atomic_dir(out_dir, "recover", inputs) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE):
                shutil.copy2(f, tmp / f.name)
        (tmp / ADAPTER_CONFIG).write_text(dumps(adapter_cfg), encoding="utf-8")
        if not isinstance(manifest_or_pruned_dir, Mapping):
            prov = dict(prov or {})
            prov["recovered"] = {
                "structure": structure_digest(manifest_or_pruned_dir),
                "pruned_dir": str(manifest_or_pruned_dir),
                "norm_a": norm_a,
            }
        if prov is not None:
            (tmp / PROVENANCE).write_text(dumps(prov), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / ADAPTER_WEIGHTS), metadata)
    return Path(out_dir)
