"""Online phase: LoRA (or QLoRA) training on the pruned model, and full-rank alignment."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loram.config import AlignParams, TrainParams
from loram.data import encode_rows, pack_text
from loram.loss import evaluate_loss
from loram.trainloop import train_loop

log = logging.getLogger(__name__)


def lora_config(p: TrainParams):
    from peft import LoraConfig

    return LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=list(p.targets) + (["lm_head"] if p.lm_head else []),
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_settings(p: TrainParams) -> dict:
    """The LoRA settings that shape the adapter (targets sorted: peft keeps them as a set)."""
    return {
        "r": p.r,
        "alpha": p.alpha,
        "dropout": p.dropout,
        "targets": sorted(set(p.targets) | ({"lm_head"} if p.lm_head else set())),
    }


def save_adapter(peft_model, out_dir) -> None:
    """``save_pretrained`` plus a canonical ``adapter_config.json``.

    peft keeps ``target_modules`` as a set, so its JSON order changes from process to process;
    sorted keys and lists make two runs with the same inputs write byte-identical files.
    """
    import json

    from loram.fsio import dumps

    # save_embedding_layers=False: the embeddings are never trained here, and peft's "auto"
    # would consult whatever model lies at base_model_name_or_path from the working directory.
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
    cfg = Path(out_dir) / "adapter_config.json"
    obj = json.loads(cfg.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules"):  # sets in peft, lists in the JSON
        if isinstance(obj.get(key), list):
            obj[key] = sorted(obj[key])
    cfg.write_text(dumps(obj), encoding="utf-8")


@contextmanager
def fp32_master_weights(model) -> Iterator[None]:
    """Hold ``model``'s floating parameters in fp32 inside the block; cast each back after.

    For full-rank training of a bf16 / fp16 model: an AdamW step is ~lr in size (5e-5 for
    alignment), far below a bf16 ulp at a typical weight's magnitude (|w|·2⁻⁸), so updates
    applied to bf16 weights would mostly round away. Training on fp32 master weights (and so
    fp32 gradients and optimizer state) and rounding once at the end is the sound choice; the
    upcast is exact and an fp32 model is untouched. Buffers keep their dtypes.
    """
    params = dict(model.named_parameters())
    dtypes = {name: p.dtype for name, p in params.items()}
    try:
        with torch.no_grad():
            for p in params.values():
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                if p.dtype != dtypes[name]:
                    p.data = p.data.to(dtypes[name])


def _base_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB), or since :func:`reset_peak_rss`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window: freed memory goes back to the OS (the block cache's idle
    blocks, glibc ``malloc_trim``), then the kernel's high-water mark is set to the current RSS
    (Linux >= 4.0: ``5`` written to ``/proc/self/clear_refs``; ``ru_maxrss`` follows it). False
    where that is not possible (another OS, a kernel that refuses): the peak then stays the
    whole process's.

    Training resets it once the model is loaded, quantized and wrapped, so the training peak
    excludes the load transient (a QLoRAM base is read in full precision before it is
    quantized), as ``torch.cuda.reset_peak_memory_stats`` does on a GPU."""
    import ctypes
    import ctypes.util

    from loram import block_cache

    block_cache.flush_if_loaded()  # its idle blocks are freed memory too
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def set_attn_implementation(model, impl: str) -> None:
    """Make ``model`` (and its sub-configs) run attention with ``impl`` (sdpa | eager).

    Models built from a config (pruned artifacts, tiny test models) or loaded by other code may
    carry another choice than the stage asks for; this sets it explicitly on every config the
    model's attention layers read.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(impl)
    else:  # pragma: no cover - older transformers: the layers read the config at forward time
        base.config._attn_implementation = impl


def attn_implementation(model) -> str:
    """The attention implementation ``model`` runs (``config._attn_implementation``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(base.config._attn_implementation)


def bound_training_heap(p: TrainParams | AlignParams, device: str | None = None) -> bool:
    """The CPU memory options of a training stage, for the rest of the process: glibc's mmap
    threshold fixed at ``p.heap_mmap_threshold`` bytes (:func:`loram.shards.bound_heap`; 0
    leaves glibc's dynamic threshold and everything else alone) and, with ``p.block_cache``
    on a CPU ``device`` (default: :func:`loram.models.default_device`), loram's block cache
    (:mod:`loram.block_cache`) as torch's CPU allocator for tensors of that size and more. The
    training stages call it before they load the model, and :func:`setup_training` again
    (idempotent). Returns whether the threshold was applied."""
    from loram.shards import bound_heap

    if not p.heap_mmap_threshold:
        return False
    applied = bound_heap(p.heap_mmap_threshold)
    if p.block_cache:
        if device is None:
            from loram.models import default_device

            device = default_device()
        if device == "cpu":
            from loram import block_cache

            block_cache.install(p.heap_mmap_threshold)
    return applied


def setup_training(model, p: TrainParams | AlignParams) -> None:
    """The memory options of a training stage on ``model`` (a causal LM or a peft model).

    * ``attn_implementation``: set explicitly (see :func:`set_attn_implementation`);
    * ``grad_checkpointing``: transformers' activation checkpointing of the decoder layers,
      non-reentrant (``use_reentrant=False``): it needs no input that requires grad, so a frozen
      base under peft LoRA works without ``enable_input_require_grads``, and it replays the
      RNG state, so dropout draws the same masks in the recomputation. (transformers also
      makes the embedding output require grad, as peft's ``enable_input_require_grads``.)

    Nothing is written to the model's config (an aligned model saved after this generates with
    its KV cache as before); the loss passes ``use_cache=False`` itself.

    * ``heap_mmap_threshold`` and ``block_cache``: see :func:`bound_training_heap`. Activations
      freed by the backward pass do not stay in glibc's heap, and on CPU the block cache hands
      their blocks to the next step's tensors instead of faulting fresh pages in.

    The loss (``loss_chunk``) is chosen per call in :func:`loram.loss.batch_loss`.
    """
    first = next(model.parameters(), None)
    bound_training_heap(p, first.device.type if first is not None else None)
    set_attn_implementation(model, p.attn_implementation)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if p.grad_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (new name)
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - older transformers
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif grad_checkpointing_on(base):
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:  # pragma: no cover - older transformers
            base.gradient_checkpointing_disable()


def grad_checkpointing_on(model) -> bool:
    """Whether transformers' activation checkpointing is enabled on ``model``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new, old name
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


class PackedDropout(torch.nn.Module):
    """Inverted dropout whose keep-mask takes four elements from each 64-bit random draw.

    torch's CPU dropout draws one random number per element (``bernoulli_``: 16-20 ms for a
    2,048 x 576 input on 2 AVX2 cores, 13% of a LoRA training step of SmolLM2 with dropout on
    all seven projections, README "Training cost") and keeps its mask for the backward pass as
    a float tensor (4 bytes per element; CUDA's fused kernel keeps 1). Here each draw is split
    into four uniform 16-bit integers and an element is kept when its integer is below
    ``round((1 - p) 2^16)``; the mask kept is a bool tensor (1 byte per element). The
    keep rate is that fraction (within 2^-17 of ``1 - p``) and the kept values are scaled
    by its inverse, so the output's expectation is the input exactly. The draws come from
    torch's global generator, as ``nn.Dropout``'s do: a seeded run repeats, and checkpointed
    recomputation (which restores the RNG state) draws the same masks. Off the CPU it is
    torch's dropout (the GPU generator is fast)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.keep = round((1.0 - self.p) * 65536)  # kept when a uniform in [0, 65536) < keep

    def extra_repr(self) -> str:
        return f"p={self.p}, keep={self.keep}/65536"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, True)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        uniform = words.view(torch.int16)[:n].view(x.shape)  # signed: [-32768, 32767]
        kept = uniform < self.keep - 32768
        # mul by a bool mask: autograd keeps the 1-byte mask, as native dropout does
        return x.mul(kept).mul_(65536.0 / self.keep)


def use_packed_dropout(model) -> int:
    """Replace every LoRA dropout (peft ``lora_dropout`` entries that are ``nn.Dropout``) by
    :class:`PackedDropout` of the same rate; returns how many were replaced."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, d in list(drops.items()):
            if isinstance(d, torch.nn.Dropout) and d.p > 0:
                drops[name] = PackedDropout(d.p)
                n += 1
    return n


def prepare_lora_model(model, p: TrainParams, device: str):
    """Quantize (``p.quantize``), freeze, wrap with peft LoRA and apply :func:`setup_training`:
    the model LoRA training (and the training-cost benchmark) runs."""
    from peft import get_peft_model

    from loram.quant import quantize_nf4

    # The frozen base stays in the dtype it was loaded in (its artifact's); NF4 layers compute
    # in that dtype too.
    base_dtype = _base_dtype(model)
    if p.quantize == "nf4":
        # Under FSDP the packed 4-bit weights are stored in the base's float dtype (shardable).
        storage = base_dtype if p.sharding == "fsdp" else torch.uint8
        model = quantize_nf4(model, compute_dtype=base_dtype, device=device, quant_storage=storage)
    model.to(device)
    for prm in model.parameters():
        prm.requires_grad_(False)
    # LoRA weights (hence their gradients and the AdamW state) are fp32 on any base: peft's
    # autocast_adapter_dtype upcasts bf16 / fp16 adapters, and the LoRA branch runs on its
    # input cast to the adapter's dtype; the loop below makes sure of it. bf16 adapters would
    # lose the small updates of a low learning rate (see fp32_master_weights).
    peft_model = get_peft_model(model, lora_config(p), autocast_adapter_dtype=True)
    with torch.no_grad():
        for prm in peft_model.parameters():
            if prm.requires_grad and prm.dtype != torch.float32:
                prm.data = prm.data.float()
    if p.dropout_rng == "packed":
        use_packed_dropout(peft_model)
    setup_training(peft_model, p)
    return peft_model


def train_lora(
    model, tokenizer, train_rows, val_rows, p: TrainParams, adapter_out, ckpt_dir
) -> dict:
    """Wrap ``model`` with LoRA, train it, save the adapter to ``adapter_out``; return metrics."""
    from loram.models import default_device
    from loram.quant import parameter_bytes

    torch.manual_seed(p.seed)
    base_dtype = _base_dtype(model)
    peft_model = prepare_lora_model(model, p, default_device())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ex = encode_rows(tokenizer, train_rows, p.seq_len)
    val_ex = encode_rows(tokenizer, val_rows[: p.max_val_rows], p.seq_len)
    mem = parameter_bytes(peft_model)
    stage_peak = peak_rss_mib()  # loading, quantizing, wrapping (a new window starts below)
    windowed = reset_peak_rss()
    t0 = time.time()
    history = train_loop(
        peft_model,
        train_ex,
        val_ex,
        p,
        ckpt_dir,
        pad,
        fingerprint_extra={"lora": lora_settings(p), "quantize": p.quantize},
        desc="lora",
    )
    seconds = time.time() - t0
    train_peak = peak_rss_mib()
    samples = p.max_steps * p.micro_batch * p.grad_accum
    if adapter_out is not None:  # None: a data-parallel rank > 0 (rank 0 saves)
        save_adapter(peft_model, adapter_out)
    return {
        "history": history,
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds, 3) if seconds > 0 else None,
        "base_param_bytes": mem["base_bytes"],
        "quantized_param_bytes": mem["quantized_bytes"],
        "lora_param_bytes": mem["trainable_bytes"],
        "params_held": mem["params"] - peft_model.get_nb_trainable_parameters()[0],
        # the whole stage (load transient included) and the training loop alone (the model
        # resident, LoRA, optimizer, activations: what training holds)
        "peak_rss_mib": round(max(stage_peak, train_peak), 1),
        "train_peak_rss_mib": round(train_peak, 1) if windowed else None,
        "quantize": p.quantize,
        "dtype": str(base_dtype).removeprefix("torch."),
        "final_val_loss": next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None),
    }


def align_model(
    model, tokenizer, texts, p: AlignParams, ckpt_dir, masks=None, val_texts=None
) -> dict:
    """Full-rank continual pre-training of a pruned model on plain text (all but lm_head).

    With ``masks`` (sparse variants) pruned weights are forced back to exact zero after every
    optimizer step.
    """
    from loram.models import default_device

    torch.manual_seed(p.seed)
    model.to(default_device())
    setup_training(model, p)
    blocks = pack_text(tokenizer, texts, p.seq_len)
    if val_texts is not None:
        val_blocks = pack_text(tokenizer, val_texts, p.seq_len, max_blocks=p.max_val_blocks)
    else:
        val_blocks, blocks = blocks[: p.max_val_blocks], blocks[p.max_val_blocks :]
    if not blocks:
        raise ValueError(f"alignment text yields no block of {p.seq_len} tokens")
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, prm in model.named_parameters():
        is_embed = "embed_tokens" in name
        is_head = name.startswith("lm_head")
        # lm_head is never trained; with tied embeddings the embedding *is* lm_head.
        prm.requires_grad_(not is_head and (not is_embed or (p.train_embeddings and not tied)))
    after = None
    if masks:
        from loram.prune.sparse import enforce_masks

        def after() -> None:
            enforce_masks(model, masks)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The losses before and after are those of the model as loaded and as saved: in its own
    # (the artifact's) dtype. Training in between uses fp32 master weights (see
    # fp32_master_weights): the result is rounded back to the artifact's dtype once.
    before = (
        evaluate_loss(model, val_blocks, p.micro_batch, pad, p.loss_chunk) if val_blocks else None
    )
    t0 = time.time()
    history = []
    if p.max_steps > 0:
        with fp32_master_weights(model):
            history = train_loop(
                model,
                blocks,
                val_blocks,
                p,
                ckpt_dir,
                pad,
                eval_every=max(1, p.max_steps // 4) if p.max_steps else 1,
                fingerprint_extra={"align": True, "masked": bool(masks)},
                after_step=after,
                desc="align",
            )
    for prm in model.parameters():
        prm.requires_grad_(False)
    after_loss = (
        evaluate_loss(model, val_blocks, p.micro_batch, pad, p.loss_chunk) if val_blocks else None
    )
    tokens = p.max_steps * p.micro_batch * p.grad_accum * p.seq_len
    return {
        "history": history,
        "tokens": tokens,
        "align_seconds": round(time.time() - t0, 2),
        "val_loss_before": before,
        "val_loss_after": after_loss,
        "val_ppl_before": _exp(before),
        "val_ppl_after": _exp(after_loss),
    }


def _exp(x):
    import math

    return None if x is None else round(math.exp(min(x, 50)), 4)


def write_loss_csv(path: str | Path, history: list[dict], arm: str) -> None:
    """Loss curve for ``dvc plots`` (one row per step; val_loss empty where not evaluated)."""
    from loram.fsio import atomic_write_text

    lines = ["arm,step,loss,val_loss,lr"]
    for h in history:
        v = h.get("val_loss")
        lines.append(
            f"{arm},{h['step']},{h['loss']:.6f},{'' if v is None else f'{v:.6f}'},{h['lr']:.3e}"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")
