"""One small, resumable training loop shared by alignment (full rank) and LoRA training.

Checkpoints hold the trainable tensors (safetensors), the optimizer and scheduler state
(``weights_only`` loading) and the step; an interrupted run resumes from its last checkpoint.
The batch order is a pure function of (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from loram.data import collate
from loram.errors import ArtifactError
from loram.fsio import atomic_dir, dumps, read_marker
from loram.loss import batch_loss, evaluate_loss

log = logging.getLogger(__name__)


# Settings that do not shape the trajectory of a run: left out of its fingerprint.
_NOT_FINGERPRINTED = (
    "keep_checkpoint",
    "save_every",
    "eval_every",
    "max_val_rows",
    "max_val_blocks",
)


def run_fingerprint(p, extra: dict | None = None) -> str:
    """Digest of the settings that shape the run (``p``: the stage's params model) plus
    ``extra`` (data and starting weights); lists and sets sorted where they are sets."""
    settings = {k: v for k, v in p.model_dump().items() if k not in _NOT_FINGERPRINTED}
    blob = dumps({**settings, **(extra or {})}, indent=None)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def examples_digest(examples: list[dict]) -> str:
    """Digest of the token ids and labels of every example, in order."""
    from array import array

    h = hashlib.sha256()
    for e in examples:
        for key in ("input_ids", "labels"):
            vals = e[key]
            h.update(len(vals).to_bytes(4, "little"))
            h.update(array("q", vals).tobytes())
    return h.hexdigest()[:16]


def weights_digest(model: torch.nn.Module, samples: int = 4096) -> str:
    """Digest of a model's starting weights: every parameter's name, shape, dtype and up to
    ``samples`` evenly spaced values (cheap even for a large model on an accelerator).

    A checkpoint is resumed only into the model it was started from: a re-pruned or re-aligned
    base (same shapes, other values) must not pick up the old run's trained tensors.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if flat.numel() == 0:
                continue
            n, k = flat.numel(), min(samples, flat.numel())
            idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)  # exact ints
            vals = flat[idx.to(flat.device)].cpu()
            if vals.dtype in (torch.bfloat16, torch.float16):
                vals = vals.float()
            h.update(vals.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def batch_indices(n: int, step: int, micro: int, accum: int, seed: int) -> list[list[int]]:
    """Micro-batches (lists of example indices) of optimizer step ``step``; epochs reshuffle."""
    per_step = micro * accum
    out = []
    for j in range(accum):
        start = step * per_step + j * micro
        idx = []
        for k in range(start, start + micro):
            epoch, pos = divmod(k, n)
            order = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            idx.append(order[pos])
        out.append(idx)
    return out


def train_loop(
    model,
    train_examples: list[dict],
    val_examples: list[dict],
    cfg,
    ckpt_dir: str | Path,
    pad_id: int,
    *,
    eval_every: int | None = None,
    fingerprint_extra: dict | None = None,
    after_step: Callable[[], None] | None = None,
    desc: str = "train",
) -> list[dict]:
    """Train the parameters of ``model`` that require grad; returns the history of logged steps.

    ``cfg`` is the stage's own params model (``TrainParams`` or ``AlignParams``): max_steps, lr,
    schedule, warmup_steps, micro_batch, grad_accum, weight_decay, max_grad_norm, save_every,
    keep_checkpoint, seed and (train) eval_every; ``eval_every`` overrides the latter.
    ``after_step`` runs after every optimizer step (e.g. re-apply sparsity masks).
    """
    eval_every = eval_every or getattr(cfg, "eval_every", None) or cfg.save_every
    if not train_examples:
        raise ValueError("no training examples (check the data source and seq_len)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    sched = get_scheduler(
        cfg.schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )

    ckpt_dir = Path(ckpt_dir)
    fp = run_fingerprint(
        cfg,
        {
            "n_train": len(train_examples),
            "data": examples_digest(train_examples),
            "weights": weights_digest(model),
            **(fingerprint_extra or {}),
        },
    )
    _clean_partial(ckpt_dir)
    step, history = _maybe_resume(model, opt, sched, ckpt_dir, fp, named)
    if step >= cfg.max_steps:
        log.info("%s: already finished (%d steps) according to %s", desc, step, ckpt_dir)
        _finish(ckpt_dir, cfg)
        return history

    model.train()
    device = _device_of(model)
    tokens_per_step = None
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    t0 = time.time()
    while step < cfg.max_steps:
        loss_sum, tok_sum = 0.0, 0
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout stream is a function of the step
        micro = batch_indices(len(train_examples), step, cfg.micro_batch, cfg.grad_accum, cfg.seed)
        n_tokens = sum(
            sum(1 for v in train_examples[i]["labels"][1:] if v != -100)
            for idx in micro
            for i in idx
        )
        for idx in micro:
            batch = collate([train_examples[i] for i in idx], pad_id)
            loss, n = batch_loss(model, batch, device, getattr(cfg, "loss_chunk", 0))
            # Token-weighted mean over the whole accumulated step.
            (loss / max(n_tokens, 1)).backward()
            loss_sum += loss.item()
            tok_sum += n
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        step += 1
        tokens_per_step = tok_sum
        rec = {"step": step, "loss": loss_sum / max(tok_sum, 1), "lr": sched.get_last_lr()[0]}
        if val_examples and (step % eval_every == 0 or step == cfg.max_steps):
            rec["val_loss"] = evaluate_loss(
                model, val_examples, cfg.micro_batch, pad_id, getattr(cfg, "loss_chunk", 0)
            )
        history.append(rec)
        bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k != "step"})
        bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            _save_checkpoint(model, opt, sched, ckpt_dir, fp, step, history, named)
    bar.close()
    _finish(ckpt_dir, cfg)
    log.info(
        "%s: %d steps in %.1fs (%s tokens in the last step)",
        desc,
        cfg.max_steps,
        time.time() - t0,
        tokens_per_step,
    )
    model.eval()
    return history


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _save_checkpoint(model, opt, sched, ckpt_dir: Path, fp: str, step: int, history, named) -> None:
    """``ckpt_dir/last``, replaced atomically (the one writer of :mod:`loram.fsio`)."""
    with atomic_dir(ckpt_dir / "last", "checkpoint") as tmp:
        save_file(
            {n: p.detach().contiguous().cpu() for n, p in named}, str(tmp / "trainable.safetensors")
        )
        torch.save(
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optim.pt"
        )
        (tmp / "state.json").write_text(
            json.dumps({"fingerprint": fp, "step": step, "history": history})
        )


def _clean_partial(ckpt_dir: Path) -> None:
    """Remove the half-written directories of a killed run (``.last.tmp-PID-*`` are removed by
    the writer; ``.tmp-STEP`` / ``.old`` are an older version's)."""
    if not ckpt_dir.is_dir():
        return
    last = ckpt_dir / "last"
    if last.is_dir() and read_marker(last) is None:  # an older version's checkpoint
        (last / ".loram-output.json").write_text(dumps({"command": "checkpoint", "format": 1}))
    for leftover in [*ckpt_dir.glob(".tmp-*"), ckpt_dir / ".old"]:
        if leftover.is_dir():
            log.info("removing the partial checkpoint %s of an interrupted run", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _finish(ckpt_dir: Path, cfg) -> None:
    """A completed run keeps its last checkpoint only if asked (``keep_checkpoint``)."""
    if cfg.keep_checkpoint:
        return
    last = ckpt_dir / "last"
    if last.is_dir():
        shutil.rmtree(last, ignore_errors=True)
        log.info("run complete: removed its checkpoint %s (keep_checkpoint: false)", last)


def _set_aside(ckpt_dir: Path, why: str) -> None:
    """Move a corrupt checkpoint to ``last.corrupt`` (replacing an older one) and say so."""
    last, aside = ckpt_dir / "last", ckpt_dir / "last.corrupt"
    shutil.rmtree(aside, ignore_errors=True)
    last.rename(aside)
    log.warning(
        "checkpoint %s is unreadable (%s); moved it to %s and starting afresh", last, why, aside
    )


def _maybe_resume(model, opt, sched, ckpt_dir: Path, fp: str, named) -> tuple[int, list]:
    last = ckpt_dir / "last"
    if not last.is_dir():
        return 0, []
    try:
        state = json.loads((last / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("state.json has no step")
    except (OSError, ValueError) as exc:
        _set_aside(ckpt_dir, f"state.json: {exc}")
        return 0, []
    if state.get("fingerprint") != fp:
        log.warning(
            "checkpoint %s was made with other settings, data or starting weights; removing it "
            "and starting afresh",
            last,
        )
        shutil.rmtree(last)
        return 0, []
    try:
        from loram.models import check_safetensors

        check_safetensors(last / "trainable.safetensors")
        tensors = load_file(str(last / "trainable.safetensors"))
        extra = torch.load(last / "optim.pt", weights_only=True)
    except (ArtifactError, OSError, RuntimeError, ValueError, EOFError) as exc:
        _set_aside(ckpt_dir, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 0, []
    params = dict(named)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ArtifactError(
            f"checkpoint {last} lacks trainable tensors, e.g. {missing[0]}; delete it to start afresh"
        )
    for n, p in params.items():
        if p.shape != tensors[n].shape:
            raise ArtifactError(
                f"checkpoint {last}: tensor {n} has shape {tuple(tensors[n].shape)}, the model "
                f"has {tuple(p.shape)}; delete it to start afresh"
            )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    opt.load_state_dict(extra["optimizer"])
    sched.load_state_dict(extra["scheduler"])
    log.info("resuming from %s at step %d", last, state["step"])
    return int(state["step"]), list(state["history"])


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Reference value of the cosine-with-warm-up schedule (used in tests)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
