"""QLoRAM: hold the (aligned) pruned base in 4-bit NF4 with double quantization (bitsandbytes)."""

from __future__ import annotations

import torch
from torch import nn

from loram.prune.common import LINEAR_PROJ


def quantize_nf4(
    model,
    compute_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    quant_storage: torch.dtype = torch.uint8,
):
    """Replace every decoder projection by a bitsandbytes NF4 ``Linear4bit`` (double quant).

    Embeddings, norms and lm_head stay as they are (in the base's dtype), as with
    ``BitsAndBytesConfig(load_in_4bit=True)``. Works on pruned (smaller) projections too.
    ``compute_dtype``: the dtype the 4-bit layers dequantize to and compute in; training passes
    the base artifact's dtype (bf16 for a bf16 base), so activations keep one dtype.
    ``quant_storage``: the dtype the packed 4-bit values are stored in (``bnb_4bit_quant_storage``);
    a float dtype (the base's) lets FSDP shard them with the rest of a decoder layer.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "train.quantize: nf4 needs bitsandbytes (pip install 'loram[quant]')"
        ) from exc

    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name in LINEAR_PROJ:
                lin = getattr(block, name, None)
                if not isinstance(lin, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    lin.in_features,
                    lin.out_features,
                    bias=lin.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    compress_statistics=True,
                    quant_storage=quant_storage,
                )
                q.weight = bnb.nn.Params4bit(
                    # (an exact upcast of a bf16 / fp16 weight; the NF4 scales come out fp32)
                    lin.weight.data.to(torch.float32).contiguous(),
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                    quant_storage=quant_storage,
                )
                if lin.bias is not None:
                    # (shares the loaded bias; _own_storage below gives it memory of its own)
                    q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
                # bitsandbytes' packed CPU inference path repacks the weight in place on the first
                # no-grad forward and needs out_features % 32 == 0, which pruned shapes break.
                q.support_avx512bf16_for_cpu = False
                setattr(block, name, q.to(device))
    _own_storage(model)
    model.config.loram_quantized = "nf4"
    return model


def _own_storage(model) -> None:
    """Give every parameter that stayed in full precision (embeddings, norms, lm_head, biases)
    memory of its own.

    A base loaded from safetensors holds views of the memory-mapped file; the projections just
    replaced by NF4 were read through that mapping, so their file pages stay mapped (and counted
    in the process's resident memory: about 1 GB on a pruned Qwen2.5-Coder-1.5B) for as long
    as any tensor still points into the file. Copying the rest out releases the mapping. Tied
    weights stay tied (one parameter object, copied once)."""
    import bitsandbytes as bnb

    with torch.no_grad():
        for prm in model.parameters():  # (each parameter object once: tied weights stay tied)
            if not isinstance(prm, bnb.nn.Params4bit):
                prm.data = prm.data.clone()


def _quant_state_bytes(qs) -> int:
    total = 0
    for attr in ("absmax", "code", "offset"):
        t = getattr(qs, attr, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    if getattr(qs, "state2", None) is not None:
        total += _quant_state_bytes(qs.state2)
    return total


def parameter_bytes(model, trainable: bool | None = None) -> dict:
    """Bytes held by the model's parameters (4-bit weights count their packed bytes and their
    quantization constants). ``trainable``: None = all, True/False = only those."""
    seen: set[int] = set()
    out = {
        "base_bytes": 0,
        "trainable_bytes": 0,
        "quantized_bytes": 0,
        "other_bytes": 0,
        "params": 0,
    }
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            nbytes += _quant_state_bytes(qs)
            out["quantized_bytes"] += nbytes
            out["params"] += int(torch.Size(qs.shape).numel())
        else:
            out["params"] += p.numel()
        if p.requires_grad:
            out["trainable_bytes"] += nbytes
        else:
            out["base_bytes"] += nbytes
            if qs is None:
                out["other_bytes"] += nbytes
    return out
