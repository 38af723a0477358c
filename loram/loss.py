"""The training and evaluation loss: summed next-token cross-entropy over labelled tokens.

Two implementations of the same quantity:

* ``chunk=0``, the stock loss: the model's own forward computes the logits of every position of
  the batch (``batch x seq x vocab``), which are upcast to fp32 for the cross-entropy. On a
  49,152-token vocabulary, micro-batch 4 x 512 tokens, one fp32 copy is 403 MB and autograd
  keeps several (logits, their fp32 upcast, the log-softmax, its gradient).
* ``chunk=N``, the chunked loss: the model body gives the hidden states (no ``lm_head`` call on
  the whole batch); only the positions whose next token carries a label are kept; those are
  projected onto the vocabulary and scored ``N`` tokens at a time. With gradients, each chunk
  runs under :func:`torch.utils.checkpoint.checkpoint`, so autograd keeps only the chunk's
  hidden states and the backward pass recomputes its logits: at most one chunk's logits
  (``N x vocab`` fp32, 50 MB for N = 256 on a 49,152 vocabulary) exist at any time. The
  projection is the model's own output-embedding module (a peft ``lora.Linear`` when
  ``train.lm_head`` adapts it), so LoRA on ``lm_head`` and tied embeddings behave as in the
  stock forward.
* ``fused`` (with ``chunk=N``, the default): where the head is a frozen plain ``nn.Linear`` (LoRA
  on the decoder only, the usual case), no chunk is recomputed: each chunk's logits are
  projected, scored and turned into the gradient of its hidden states at once, in the forward
  pass (:class:`_FusedHeadCE`), and the backward pass only scales that saved gradient. The
  vocabulary projection then runs twice per scored token (forward, input gradient) instead of
  three times, and autograd keeps one ``tokens x hidden`` tensor, as the checkpointed chunks do.

The chunked loss runs as the causal LM's own forward (for the duration of the call, see
:func:`_loss_forward`), reached through whatever wraps the model: peft, accelerate's DDP (whose
gradient sync is armed by its forward) and FSDP2 (whose root unshards the embeddings, the final
norm and ``lm_head`` in its forward and keeps them for the backward's recomputation). So one
process, several processes and sharded training all use it.

Both give the same loss and gradients up to float rounding (tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutput

from loram.data import collate

log = logging.getLogger(__name__)

# Config attributes of architectures whose forward changes the logits after lm_head (soft
# capping, scaling): the chunked path would not reproduce them, so those models use the stock
# loss. None of the supported families (Llama, Qwen2, Mistral, SmolLM) sets them.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
)


def _causal_lm(model) -> torch.nn.Module:
    """The causal LM inside the wrappers a training step calls: DDP (``.module``) and peft
    (``get_base_model``). FSDP2 wraps in place (the module is its own wrapper)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder body, output-embedding module)`` of a causal LM (or a peft / DDP model around
    one), or None when the chunked loss cannot reproduce the model's logits.

    The head is the module the model's own forward calls (``get_output_embeddings``): with peft
    LoRA on ``lm_head`` it is the LoRA-wrapped layer, not the raw weight.
    """
    base = _causal_lm(model)
    config = getattr(base, "config", None)
    if config is None or any(
        getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS
    ):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if head is None or body is None or body is base:
        return None
    return body, head


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits in fp32 for the cross-entropy (fp32 and fp64 stay as they are)."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: its logits exist only inside this call."""
    return F.cross_entropy(_upcast(head(hidden)), labels, reduction="sum")


def _fusable(head: torch.nn.Module) -> bool:
    """Whether the head is a frozen plain linear layer (its gradient can be taken in the
    forward pass): not a peft LoRA layer, not quantized, nothing of it trained, and no hook on
    it (the fused loss reads its weight instead of calling it, so hooks would not run)."""
    return (
        type(head) is torch.nn.Linear
        and not any(p.requires_grad for p in head.parameters())
        and not (head._forward_hooks or head._forward_pre_hooks)
    )


class _FusedHeadCE(torch.autograd.Function):
    """Summed cross-entropy of ``linear(hidden, weight, bias)`` against ``labels``, ``chunk``
    rows at a time, with the gradient of each chunk's hidden states taken at once in the forward
    pass (softmax minus the one-hot label, times the weight): no logits outlive their chunk
    and none is recomputed. For a frozen head only (no weight gradient is formed)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):
        grad = torch.empty_like(hidden)
        total = None
        for i in range(0, labels.numel(), chunk):
            h, y = hidden[i : i + chunk], labels[i : i + chunk]
            raw = F.linear(h, weight, bias)  # under an ambient autocast as the head would run
            logp = torch.log_softmax(_upcast(raw), dim=-1)
            part = -logp.gather(1, y[:, None]).sum()
            total = part if total is None else total + part
            probs = logp.exp_()  # d(sum of -log p_y) / d logits = softmax - one-hot
            probs[torch.arange(y.numel(), device=y.device), y] -= 1
            grad[i : i + chunk] = (probs.to(raw.dtype) @ weight.to(raw.dtype)).to(hidden.dtype)
            del raw, logp, probs
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def _inputs(batch: dict) -> dict:
    """The model inputs of a collated batch: padded (``attention_mask``) or packed
    (``position_ids``, no mask: see :func:`loram.data.collate_packed`)."""
    out = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if batch.get("position_ids") is not None:
        out["position_ids"] = batch["position_ids"]
    return out


def _stock_loss(model, batch: dict) -> torch.Tensor:
    logits = model(**_inputs(batch), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        _upcast(logits[:, :-1]).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def _chunked_loss(
    body, head, batch: dict, chunk: int, use_checkpoint: bool = True, fused: bool = True
) -> torch.Tensor:
    hidden = body(**_inputs(batch), use_cache=False)[0]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    hidden = hidden[:, :-1][keep]  # (scored tokens, hidden): position t predicts token t + 1
    labels = labels[keep]
    ckpt = use_checkpoint and torch.is_grad_enabled()
    # (no labelled token: a zero that still carries the graph, as the stock loss's sum does)
    if labels.numel() == 0:
        return _upcast(hidden).sum() * 0.0
    if ckpt and fused and hidden.requires_grad and _fusable(head):
        return _FusedHeadCE.apply(hidden, head.weight, head.bias, labels, chunk)
    total = 0.0
    for i in range(0, labels.numel(), chunk):
        h, y = hidden[i : i + chunk], labels[i : i + chunk]
        if ckpt:
            # preserve_rng_state (default): a LoRA dropout on lm_head draws the same mask again
            # when the backward pass recomputes the chunk.
            part = checkpoint(partial(_chunk_ce, head), h, y, use_reentrant=False)
        else:
            part = _chunk_ce(head, h, y)
        total = total + part
    return total


@contextlib.contextmanager
def _loss_forward(model, body, head, chunk: int, use_checkpoint: bool, fused: bool = True):
    """For the duration of the block, the causal LM inside ``model`` computes the chunked loss
    as its forward (``labels`` required; ``.loss`` is the summed cross-entropy, no logits).

    Calling the outermost module keeps every wrapper's hooks in play (DDP, FSDP2, peft, an
    accelerate autocast). The forward is set on the instance and the previous instance
    attribute, if any (accelerate's mixed-precision wrapper), is put back afterwards."""
    base = _causal_lm(model)
    had = "forward" in base.__dict__
    previous = base.__dict__.get("forward")

    def forward(input_ids=None, attention_mask=None, labels=None, position_ids=None, **_):
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
        }
        loss = _chunked_loss(body, head, batch, chunk, use_checkpoint, fused)
        return CausalLMOutput(loss=loss)

    base.forward = forward
    try:
        yield
    finally:
        if had:
            base.forward = previous
        else:
            del base.forward


def batch_loss(
    model, batch: dict, device, chunk: int = 0, *, use_checkpoint: bool = True, fused: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a collated batch and its number of scored tokens.

    ``model``: a causal LM, or one wrapped by peft, DDP or FSDP2 (the call goes through the
    outermost wrapper in every case). ``chunk``: 0 = the stock loss over the model's full
    logits; N > 0 = the chunked loss over the labelled positions, N tokens per vocabulary
    projection (see the module docstring). Models whose forward transforms the logits after
    ``lm_head`` always use the stock loss. ``fused`` (train.loss_fused): a frozen plain head takes
    each chunk's gradient in the forward pass instead of recomputing the chunk (see the module
    docstring). ``use_checkpoint=False`` keeps every chunk's graph (for tests of the
    recomputation).
    """
    if chunk < 0:
        raise ValueError(f"loss chunk must be >= 0 (0: the stock loss), got {chunk}")
    batch = {k: v.to(device) for k, v in batch.items()}
    n = int((batch["labels"][:, 1:] != -100).sum())
    parts = body_and_head(model) if chunk else None
    if chunk and parts is None:
        log.warning("loss_chunk %d: this model transforms its logits; using the stock loss", chunk)
    if parts is None:
        return _stock_loss(model, batch), n
    with _loss_forward(model, *parts, chunk, use_checkpoint, fused):
        out = model(**_inputs(batch), labels=batch["labels"], use_cache=False)
    return out.loss, n


@torch.no_grad()
def evaluate_loss(
    model, examples: list[dict], batch_size: int, pad_id: int, chunk: int = 0
) -> float:
    """Mean token-level cross-entropy over ``examples`` (labels != -100).

    ``chunk`` as in :func:`batch_loss` (without gradients no chunk is recomputed; the saving
    is the full-logits tensor of each batch)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        lp, n = batch_loss(model, collate(examples[i : i + batch_size], pad_id), device, chunk)
        total += lp.item()
        count += n
    model.train(was_training)
    return total / max(count, 1)
