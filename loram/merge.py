"""Merge a (recovered) LoRA adapter into the original, unpruned model.

Without masks this is peft's ``merge_and_unload``: W ← W + scale·B·A. With ``masks``
(module path -> bool tensor of W's shape, True = kept weight) the update of those modules is
masked before it is added, W ← W + mask ⊙ (scale·B·A), so weights a sparse method zeroed stay
exactly as they are in the base.

The sum is computed in fp32 for every plain LoRA linear layer, whatever the base's dtype, and
rounded to it once: a bf16 / fp16 base gets round(W + scale·B·A), the bf16 rounding of the
exact fp32 merge, never the sum of two separately rounded terms.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loram.errors import ArtifactError
from loram.fsio import atomic_dir
from loram.models import artifact_dtype, check_adapter_dir, check_safetensors, load_hf_model
from loram.prune.artifact import MANIFEST_NAME, read_manifest
from loram.prune.structured import STRUCTURED_METHODS
from loram.recover import ADAPTER_WEIGHTS, read_provenance

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$"
)

__all__ = ["merge_adapter", "merge_to_dir"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_adapter_fits(peft_model, adapter_dir: Path) -> None:
    """Every tensor in the adapter file must exist in the wrapped model with the same shape."""
    from peft import get_peft_model_state_dict

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as fh:
        file_shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    # save_embedding_layers=False: peft's "auto" compares the vocabulary with whatever model
    # lies at the adapter's base_model_name_or_path relative to the working directory.
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    model_shapes = {k: tuple(v.shape) for k, v in state.items()}
    # peft lists lm_head/embedding base weights too; a recovered adapter omits them on purpose.
    missing = sorted(k for k in set(model_shapes) - set(file_shapes) if ".base_layer." not in k)
    extra = sorted(set(file_shapes) - set(model_shapes))
    if missing or extra:
        raise ValueError(
            f"adapter {adapter_dir} does not fit the model: missing in the file {missing[:5]}, "
            f"not in the model {extra[:5]}"
        )
    for k, s in file_shapes.items():
        if model_shapes[k] != s:
            raise ValueError(
                f"adapter {adapter_dir}: {k} has shape {s} in the file but {model_shapes[k]} in the model"
            )


def precheck_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Before peft loads it: every LoRA matrix must fit the module it adapts in ``model``.

    An adapter still in the pruned model's shapes (not recovered), or one trained on another
    model, is refused with the first mismatch and both shapes, instead of peft's pages of
    size-mismatch lines.
    """
    adapter_dir = Path(adapter_dir)
    header = check_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    modules = dict(model.named_modules())
    prov = read_provenance(adapter_dir) or {}
    unrecovered = prov.get("pruned") and not prov.get("recovered")
    for key in sorted(k for k in header if k != "__metadata__"):
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        mod = modules.get(m["module"])
        if mod is None:
            raise ArtifactError(
                f"adapter {str(adapter_dir)!r}: {key} adapts {m['module']}, which the model does "
                "not have (an adapter for another architecture?)"
            )
        shape = tuple(header[key]["shape"])
        w = getattr(mod, "weight", None)
        if w is None or w.ndim != 2 or len(shape) != 2:
            continue
        want = (shape[0], w.shape[1]) if m["kind"] == "lora_A" else (w.shape[0], shape[1])
        if shape != want:
            why = (
                "it was trained on a pruned model and not recovered: run `loram recover` first"
                if unrecovered
                else "was it trained on another model, or not recovered after pruning?"
            )
            raise ArtifactError(
                f"adapter {str(adapter_dir)!r}: {key} has shape {shape} but the model's "
                f"{m['module']} (weight {tuple(w.shape)}) needs {want}; {why}"
            )


def merge_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Merge the peft adapter in ``adapter_dir`` into ``model``; return a plain transformers model.

    ``model`` is modified in place. ``masks``: module path (``model.layers.4.mlp.up_proj``) ->
    bool tensor shaped like that module's weight; masked-out weights are left untouched.
    """
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    precheck_adapter(model, adapter_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    _check_adapter_fits(peft_model, adapter_dir)

    check = getattr(peft_model.base_model, "_check_merge_allowed", None)
    if check is not None:  # what peft's merge_and_unload checks first (gptq, replicated layers)
        check()
    masks = masks or {}
    inner = peft_model.base_model.model
    modules = dict(inner.named_modules())
    unknown = sorted(set(masks) - set(modules))
    if unknown:
        raise KeyError(f"masks name modules that are not in the model: {unknown[:5]}")
    for name, mod in modules.items():
        if not isinstance(mod, LoraLayer):
            continue
        base = mod.get_base_layer()
        mask = masks.get(name)
        if mask is not None and (
            mask.dtype != torch.bool or tuple(mask.shape) != tuple(base.weight.shape)
        ):
            raise ValueError(
                f"mask for {name} must be a bool tensor of shape {tuple(base.weight.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        plain = isinstance(mod, LoraLinear) and all(
            adapter not in getattr(mod, "lora_variant", {})
            and not mod.lora_bias.get(adapter, False)
            for adapter in mod.active_adapters
            if adapter in mod.lora_A
        )
        if not plain:
            if mask is not None:
                raise ValueError(
                    f"{name}: masked merge supports plain LoRA only (no DoRA / lora_bias)"
                )
            mod.merge()  # peft's own merge (embeddings, DoRA, ...)
            continue
        for adapter in mod.active_adapters:
            if adapter not in mod.lora_A:
                continue
            # fp32 whatever the base's dtype; one rounding to it at the end.
            update = mod.get_delta_weight(adapter).float()
            w = base.weight
            if mask is not None:
                update = update * mask.to(device=w.device, dtype=torch.float32)
            w.data = (w.data.float() + update).to(w.dtype)
    return peft_model.unload()


def _precheck_on_meta(base_dir, adapter_dir) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from loram.models import check_model_dir, load_config

    check_model_dir(base_dir, "base model")
    with init_empty_weights(include_buffers=False):
        meta = AutoModelForCausalLM.from_config(load_config(base_dir))
    precheck_adapter(meta, adapter_dir)


def merge_to_dir(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | str = "auto",
    masks: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Load the base, merge the adapter in fp32, write ``dtype`` and save a plain model dir.

    ``dtype``: ``auto`` = the dtype ``base_dir`` is saved in; or float32 / bfloat16 / float16.
    When it is the base's own dtype the base is loaded in it (W + scale·B·A is still summed in
    fp32 per layer, see :func:`merge_adapter`); otherwise it is loaded in fp32 (exact for a
    bf16 / fp16 base), so the merged weights are rounded once, to ``dtype``.

    The result (safetensors + config, + tokenizer files if ``base_dir`` has them) loads with
    ``AutoModelForCausalLM.from_pretrained`` without peft. Written atomically.
    """
    if isinstance(dtype, str) and dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype = {dtype!r}; expected one of auto, {', '.join(_DTYPES)}")
    base_dir = Path(base_dir)
    if (base_dir / MANIFEST_NAME).is_file():
        method = read_manifest(base_dir).get("method")
        if method in STRUCTURED_METHODS:
            raise ValueError(
                f"{base_dir} is a {method}-pruned model: merge the recovered adapter into the "
                "original, unpruned model"
            )
    check_adapter_dir(adapter_dir)
    _precheck_on_meta(base_dir, adapter_dir)  # a mismatch fails before the model is loaded
    stored = artifact_dtype(base_dir)
    if dtype == "auto":
        dtype = stored
    elif isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    model = load_hf_model(base_dir, stored if dtype == stored else torch.float32, what="base model")
    merged = merge_adapter(model, adapter_dir, masks).to(dtype)
    with atomic_dir(out_dir, "merge", [base_dir, adapter_dir]) as tmp:
        merged.save_pretrained(tmp)
        for name in _TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
    return Path(out_dir)
