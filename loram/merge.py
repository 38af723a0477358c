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

import copy
import logging
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
from loram.shards import DEFAULT_SHARD_BYTES

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

log = logging.getLogger(__name__)


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
    streaming: bool = True,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
) -> Path:
    """Merge the adapter into the base in fp32, write ``dtype`` and save a plain model dir.

    ``dtype``: ``auto`` = the dtype ``base_dir`` is saved in; or float32 / bfloat16 / float16.
    When it is the base's own dtype the base is loaded in it (W + scale·B·A is still summed in
    fp32 per layer, see :func:`merge_adapter`); otherwise it is loaded in fp32 (exact for a
    bf16 / fp16 base), so the merged weights are rounded once, to ``dtype``.

    ``streaming`` (default): the base is read tensor by tensor and the merged weights are
    written to shards of at most ``max_shard_bytes`` as they are made (see
    :func:`_merge_streaming`), so memory holds one weight matrix at a time, not the model; the
    result equals the in-memory path (``streaming=False``) bit for bit. Adapters the streaming
    path cannot merge without the whole model (LoRA on embeddings or a tied lm_head, DoRA,
    ``modules_to_save`` ...) fall back to the in-memory path, with a log line.

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
    load_dtype = stored if dtype == stored else torch.float32
    if streaming and _merge_streaming(
        base_dir, Path(adapter_dir), out_dir, load_dtype, dtype, masks, max_shard_bytes
    ):
        return Path(out_dir)
    model = load_hf_model(base_dir, load_dtype, what="base model")
    merged = merge_adapter(model, adapter_dir, masks).to(dtype)
    with atomic_dir(out_dir, "merge", [base_dir, adapter_dir]) as tmp:
        merged.save_pretrained(tmp)
        for name in _TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
    return Path(out_dir)


def _plain_lora(mod) -> bool:
    """A peft LoRA ``Linear`` whose active adapters are plain (no DoRA / variant / lora_bias)."""
    from peft.tuners.lora import Linear as LoraLinear

    return isinstance(mod, LoraLinear) and all(
        adapter not in getattr(mod, "lora_variant", {}) and not mod.lora_bias.get(adapter, False)
        for adapter in mod.active_adapters
        if adapter in mod.lora_A
    )


def _meta_peft(base_dir: Path, adapter_dir: Path, load_dtype: torch.dtype):
    """The base model on the meta device wrapped by peft with the adapter's real LoRA weights.

    Returns ``(peft_model, config)``. The LoRA matrices are cast to float32 when stored in
    bf16 / fp16, as peft's ``autocast_adapter_dtype`` does when it loads them onto a real model.
    """
    from accelerate import init_empty_weights
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loram.models import _quiet_transformers, load_config

    config = load_config(base_dir)
    with init_empty_weights(include_buffers=False), _quiet_transformers():
        meta = AutoModelForCausalLM.from_config(config, dtype=load_dtype)
    peft_model = PeftModel.from_pretrained(meta, str(adapter_dir), low_cpu_mem_usage=True)
    # peft leaves the LoRA weights on the device of the (meta) base layers: put the file's
    # values in, in the dtype peft gives them on a real model (float32 for a bf16 / fp16 file).
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    name = peft_model.active_adapter
    for pname, p in list(peft_model.named_parameters()):
        if ".lora_" not in pname:
            continue
        key = pname.replace(f".{name}.", ".")
        if key not in state:
            raise ValueError(f"adapter {adapter_dir}: {key} is not in {ADAPTER_WEIGHTS}")
        value = state.pop(key)
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(
                f"adapter {adapter_dir}: {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(p.shape)} in the model"
            )
        parent, _, attr = pname.rpartition(".")
        dtype = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        peft_model.get_submodule(parent)._parameters[attr] = torch.nn.Parameter(
            value.to(dtype), requires_grad=False
        )
    return peft_model, config


def _merge_streaming(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: str | os.PathLike,
    load_dtype: torch.dtype,
    dtype: torch.dtype,
    masks: Mapping[str, torch.Tensor] | None,
    max_shard_bytes: int | str,
) -> bool:
    """Merge tensor by tensor; False (nothing written) when the adapter needs the in-memory path.

    Every base tensor is read, cast as the in-memory path loads it (``load_dtype``), merged if
    its module is a plain LoRA linear layer — ``(W.float() + mask ⊙ ΔW).to(load_dtype)`` with
    ΔW from peft's own ``get_delta_weight`` on a meta-device copy of the model that holds only
    the LoRA weights — cast to ``dtype`` and written to the next shard. Peak memory: the LoRA
    weights plus the largest tensor (the embeddings) and its fp32 copy.
    """
    from peft.tuners.lora import LoraLayer
    from tqdm.auto import tqdm

    from loram.models import check_shapes_against_config
    from loram.shards import ShardReader, ShardWriter, bound_heap

    bound_heap()
    reader = ShardReader(base_dir)
    peft_model, config = _meta_peft(base_dir, adapter_dir, load_dtype)
    _check_adapter_fits(peft_model, adapter_dir)
    check = getattr(peft_model.base_model, "_check_merge_allowed", None)
    if check is not None:
        check()
    inner = peft_model.base_model.model
    modules = dict(inner.named_modules())
    masks = masks or {}
    unknown = sorted(set(masks) - set(modules))
    if unknown:
        raise KeyError(f"masks name modules that are not in the model: {unknown[:5]}")
    cfg = peft_model.peft_config[peft_model.active_adapter]
    lora: dict[str, object] = {}
    why = None
    if getattr(cfg, "modules_to_save", None) or getattr(cfg, "trainable_token_indices", None):
        why = "the adapter has modules_to_save / trainable tokens"
    for name, mod in modules.items():
        if why is None and isinstance(mod, LoraLayer):
            if not _plain_lora(mod):
                why = f"{name} is not a plain LoRA linear layer"
            elif f"{name}.weight" not in reader:
                why = f"{name}.weight is not stored in the base (tied weights)"
            lora[f"{name}.weight"] = mod
    if why is None:
        names = {k.replace(".base_layer.", ".") for k in inner.state_dict() if ".lora_" not in k}
        extra = sorted(set(reader.keys()) - names)
        if extra:
            why = f"the base stores tensors the model does not name: {extra[:3]}"
    if why is not None:
        log.info("merge: %s; merging in memory instead of streaming", why)
        return False
    for name, mask in masks.items():
        shape = reader.shape(f"{name}.weight") if f"{name}.weight" in reader else None
        if mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(
                f"mask for {name} must be a bool tensor of shape {shape}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
    check_shapes_against_config(base_dir, config)

    with atomic_dir(out_dir, "merge", [base_dir, adapter_dir]) as tmp:
        with ShardWriter(tmp, max_shard_bytes) as writer:
            for key in tqdm(reader.keys(), desc="merge (streaming)", unit="tensor"):
                t = reader.get(key)
                w = t.to(load_dtype) if t.is_floating_point() else t
                mod = lora.get(key)
                if mod is not None:
                    with torch.no_grad():
                        for adapter in mod.active_adapters:
                            if adapter not in mod.lora_A:
                                continue
                            update = mod.get_delta_weight(adapter).float()
                            mask = masks.get(key.removesuffix(".weight"))
                            if mask is not None:
                                update = update * mask.to(dtype=torch.float32)
                            w = (w.float() + update).to(load_dtype)
                            del update
                if w.is_floating_point():
                    w = w.to(dtype)
                writer.add(key, w)
                del t, w
        _write_config(base_dir, config, dtype, tmp)
        for name in _TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
    return True


def _write_config(base_dir: Path, config, dtype: torch.dtype, out: Path) -> None:
    """``config.json`` (recording ``dtype``) and ``generation_config.json`` as
    ``save_pretrained`` of the loaded model would write them."""
    from transformers import GenerationConfig

    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(out)
    if (base_dir / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base_dir)
    else:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(out)
