"""One small, resumable training loop shared by alignment (full rank) and LoRA training.

Checkpoints hold the trainable tensors (safetensors), the optimizer and scheduler state
(``weights_only`` loading) and the step; an interrupted run resumes from its last checkpoint.
The batch order is a pure function of (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import contextlib
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

from loram.data import collate, collate_packed
from loram.errors import ArtifactError
from loram.fsio import atomic_dir, dumps, read_marker
from loram.loss import batch_loss

log = logging.getLogger(__name__)


# Settings that do not shape the trajectory of a run: left out of its fingerprint.
_NOT_FINGERPRINTED = (
    "keep_checkpoint",
    "save_every",
    "eval_every",
    "max_val_rows",
    "max_val_blocks",
    "processes",  # N processes follow the 1-process trajectory (a run may resume with another N)
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


def rank_share(micro: list[list[int]], rank: int, n: int) -> list[tuple[int, list[int]]]:
    """The micro-batches ``(j, indices)`` of a step that rank ``rank`` of ``n`` runs: j ≡ rank
    (mod n). Every micro-batch goes to exactly one rank, whole and unchanged."""
    return [(j, idx) for j, idx in enumerate(micro) if j % n == rank]


def micro_seed(seed: int, step: int, j: int) -> int:
    """Seed of the dropout stream of micro-batch ``j`` of step ``step``: a function of the
    micro-batch, not of the process that runs it, so N processes draw the same masks as one.
    Micro-batch 0 keeps the per-step seed of earlier versions (runs with ``grad_accum: 1`` are
    unchanged); ``j`` is added above bit 32, so no two (step, j) share a seed."""
    return seed * 1_000_003 + step + (j << 32)


def adamw_impl(choice: str, device, sharded: bool) -> dict:
    """AdamW's keyword arguments for ``train.optimizer`` / ``align.optimizer``: auto is torch's
    fused kernel (one pass over every tensor per step) on a CPU or CUDA device unless the
    parameters are FSDP shards, where torch's own default is kept."""
    if choice == "auto":
        choice = "fused" if torch.device(device).type in ("cpu", "cuda") and not sharded else ""
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for_loop": {"foreach": False}}.get(choice, {})  # fmt: skip


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
    keep_checkpoint, seed, processes, sharding, precision and (train) eval_every;
    ``eval_every`` overrides the latter. ``after_step`` runs after every optimizer step (e.g.
    re-apply sparsity masks).

    The engine is accelerate: one process, or (inside a worker of
    :func:`loram.distributed.launch`) one of ``cfg.processes`` data-parallel ranks under DDP or
    FSDP2. Each step's global batch (``micro_batch x grad_accum`` examples) is the same whatever
    the number of processes; rank r runs micro-batches r, r+N, ... and the gradients are summed
    across ranks. Only rank 0 writes checkpoints and logs.
    """
    from loram import distributed as dist

    eval_every = eval_every or getattr(cfg, "eval_every", None) or cfg.save_every
    if not train_examples:
        raise ValueError("no training examples (check the data source and seq_len)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    sharded = cfg.sharding == "fsdp"
    if sharded and after_step is not None:
        raise ArtifactError(
            "sharding: fsdp cannot re-apply sparsity masks after each step (semi / unstructured "
            "bases); use sharding: none for them"
        )
    section = "align" if desc == "align" else "train"
    dist.check_split(section, cfg)
    micro_batch, grad_accum = dist.layout(section, cfg)
    acc = dist.accelerator(cfg, model)
    try:
        return _train(
            acc, model, named, train_examples, val_examples, cfg, Path(ckpt_dir), pad_id,
            eval_every, fingerprint_extra, after_step, desc, sharded, (micro_batch, grad_accum),
        )  # fmt: skip
    finally:
        if not dist.in_worker():
            dist.release()


def _train(
    acc, model, named, train_examples, val_examples, cfg, ckpt_dir: Path, pad_id, eval_every,
    fingerprint_extra, after_step, desc, sharded, micro_layout,
) -> list[dict]:  # fmt: skip
    n_proc, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    fp = run_fingerprint(
        cfg,
        {
            "n_train": len(train_examples),
            "data": examples_digest(train_examples),
            "weights": weights_digest(model),
            # the micro-batches a step is cut into (they set the dropout streams)
            "layout": list(micro_layout),
            **(fingerprint_extra or {}),
        },
    )
    # Rank 0 tidies and validates the checkpoint (it may set it aside); then every rank reads it.
    resumed = None
    if main:
        _clean_partial(ckpt_dir)
        resumed = _read_checkpoint(ckpt_dir, fp, named)
    acc.wait_for_everyone()
    if not main:
        resumed = _read_checkpoint(ckpt_dir, fp, named)
    acc.wait_for_everyone()  # read by all before rank 0 may remove it (finished, a new save)
    step, history, optim_state = resumed if resumed else (0, [], None)
    if step >= cfg.max_steps:
        if main:
            log.info("%s: already finished (%d steps) according to %s", desc, step, ckpt_dir)
            _finish(ckpt_dir, cfg)
        return history

    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        **adamw_impl(cfg.optimizer, acc.device, sharded),
    )
    wrapped, opt = acc.prepare(model, opt)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    if main:
        log.info("%s: %s", desc, _engine_line(acc, wrapped))
    sched = get_scheduler(
        cfg.schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )
    if optim_state is not None:
        _load_optimizer(wrapped, opt, optim_state["optimizer"], sharded)
        sched.load_state_dict(optim_state["scheduler"])

    wrapped.train()
    device = acc.device
    # The chunked loss runs as the model's forward, through the engine's wrapper (DDP, FSDP2):
    # every process and every sharding uses it (loram.loss.batch_loss).
    chunk = cfg.loss_chunk
    fused = cfg.loss_fused  # (EngineParams: alignment and LoRA training both have it)
    tokens_per_step = None
    bar = tqdm(
        total=cfg.max_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
        disable=not main,
    )  # fmt: skip
    t0 = time.time()
    while step < cfg.max_steps:
        micro = batch_indices(len(train_examples), step, *micro_layout, cfg.seed)
        n_tokens = sum(
            sum(1 for v in train_examples[i]["labels"][1:] if v != -100)
            for idx in micro
            for i in idx
        )
        # The data-parallel engine averages gradients over the ranks; each rank's loss is
        # scaled by N so the step's gradient is the token-weighted mean over the global batch.
        denom = max(n_tokens, 1) / n_proc
        mine = rank_share(micro, rank, n_proc)
        loss_sum, tok_sum = 0.0, 0
        for k, (j, idx) in enumerate(mine):
            torch.manual_seed(micro_seed(cfg.seed, step, j))  # dropout: a function of (step, j)
            rows = [train_examples[i] for i in idx]
            if getattr(cfg, "packing", False):  # (train only: align packs its text already)
                batch = collate_packed(rows, pad_id, cfg.seq_len)
            else:
                batch = collate(rows, pad_id)
            last = k == len(mine) - 1
            with contextlib.nullcontext() if last else acc.no_sync(wrapped):
                with acc.autocast():
                    loss, n = batch_loss(wrapped, batch, device, chunk, fused=fused)
                acc.backward(loss / denom)
            loss_sum += loss.item()
            tok_sum += n
        if n_proc > 1:
            tot = acc.reduce(torch.tensor([loss_sum, tok_sum], dtype=torch.float64, device=device))
            loss_sum, tok_sum = float(tot[0]), int(tot[1])
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        step += 1
        tokens_per_step = tok_sum
        rec = {"step": step, "loss": loss_sum / max(tok_sum, 1), "lr": sched.get_last_lr()[0]}
        if val_examples and (step % eval_every == 0 or step == cfg.max_steps):
            rec["val_loss"] = _val_loss(
                acc,
                wrapped,
                val_examples,
                cfg.micro_batch,
                pad_id,
                sharded,
                chunk,
            )
        history.append(rec)
        bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k != "step"})
        bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            _save_checkpoint(acc, wrapped, opt, sched, ckpt_dir, fp, step, history, named, sharded)
    bar.close()
    if main:
        _finish(ckpt_dir, cfg)
        log.info(
            "%s: %d steps in %.1fs on %d process(es) (%s tokens in the last step)",
            desc,
            cfg.max_steps,
            time.time() - t0,
            n_proc,
            tokens_per_step,
        )
    if sharded:
        _gather_into(acc, wrapped, model)
    model.eval()
    return history


def _engine_line(acc, wrapped) -> str:
    """One line on the engine: accelerate's mode, processes, precision, sharded parameters."""
    from torch.distributed.tensor import DTensor

    params = list(wrapped.parameters())
    shard = sum(isinstance(p, DTensor) for p in params)
    return (
        f"accelerate {'FSDP2' if shard else acc.distributed_type.value} on "
        f"{acc.num_processes} process(es), device "
        f"{acc.device.type}, mixed precision {acc.mixed_precision}, {shard} of {len(params)} "
        "parameter tensors sharded"
    )


def _val_loss(
    acc, wrapped, examples, batch_size: int, pad_id: int, sharded: bool, chunk: int = 0
) -> float:
    """Mean token cross-entropy over ``examples``: the batches are dealt to the ranks (batch b
    to rank b mod N) and the sums reduced; under FSDP every rank runs every batch (each forward
    is a collective there) and counts only its own."""
    model = wrapped if sharded else acc.unwrap_model(wrapped)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b, i in enumerate(range(0, len(examples), batch_size)):
            if b % acc.num_processes != acc.process_index and not sharded:
                continue
            batch = collate(examples[i : i + batch_size], pad_id)
            with acc.autocast():
                lp, n = batch_loss(model, batch, acc.device, chunk)
            if b % acc.num_processes == acc.process_index:
                total += lp.item()
                count += n
    model.train(was_training)
    if acc.num_processes > 1:
        tot = acc.reduce(torch.tensor([total, count], dtype=torch.float64, device=acc.device))
        total, count = float(tot[0]), int(tot[1])
    return total / max(count, 1)


def _load_optimizer(wrapped, opt, state: dict, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            wrapped, opt.optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
    else:
        opt.load_state_dict(state)


def _full_state(wrapped, opt, names: set[str], sharded: bool) -> tuple[dict, dict | None]:
    """FSDP: the trainable tensors and optimizer state gathered in full (a collective: every
    rank calls it; rank 0 gets the tensors, on the CPU)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(wrapped, options=o)
    osd = get_optimizer_state_dict(wrapped, opt.optimizer, options=o) if opt is not None else None
    return {n: t for n, t in msd.items() if n in names}, osd


def _gather_into(acc, wrapped, model) -> None:
    """After FSDP training: every rank leaves with a plain ``model`` holding the full trained
    tensors (the stage then evaluates and saves it as after a 1-process run).

    FSDP2 has no public inverse of ``fully_shard``: the full state dict is gathered (a
    collective), each sharded parameter replaced by a plain one, and each sharded module's
    forward hooks removed and its class restored (``fully_shard`` made it ``FSDP<class>``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    for name, module in list(model.named_modules()):
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            key = f"{name}.{pname}" if name else pname
            if key in full:
                module._parameters[pname] = torch.nn.Parameter(
                    full[key].detach().clone(), requires_grad=p.requires_grad
                )
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            for handle in {state._pre_forward_hook_handle, state._post_forward_hook_handle}:
                handle.remove()
            module.__class__ = next(
                c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule)
            )
    acc.wait_for_everyone()


def _save_checkpoint(
    acc, wrapped, opt, sched, ckpt_dir: Path, fp: str, step: int, history, named, sharded: bool
) -> None:
    """``ckpt_dir/last``, replaced atomically (the one writer of :mod:`loram.fsio`) by rank 0;
    the other ranks wait for it (under FSDP they first help gather the full state)."""
    if sharded:
        tensors, optim = _full_state(wrapped, opt, {n for n, _ in named}, sharded)
    elif acc.is_main_process:
        tensors = {n: p.detach().contiguous().cpu() for n, p in named}
        optim = opt.state_dict()
    if acc.is_main_process:
        with atomic_dir(ckpt_dir / "last", "checkpoint") as tmp:
            save_file(
                {n: t.detach().contiguous().cpu() for n, t in tensors.items()},
                str(tmp / "trainable.safetensors"),
            )
            torch.save({"optimizer": optim, "scheduler": sched.state_dict()}, tmp / "optim.pt")
            (tmp / "state.json").write_text(
                json.dumps({"fingerprint": fp, "step": step, "history": history})
            )
    acc.wait_for_everyone()


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


def _read_checkpoint(ckpt_dir: Path, fp: str, named) -> tuple[int, list, dict] | None:
    """Resume from ``ckpt_dir/last`` if it was made by this run (same fingerprint): copies its
    trainable tensors into ``named`` and returns (step, history, optimizer + scheduler state);
    None to start afresh (no checkpoint; another run's, removed; unreadable, set aside)."""
    last = ckpt_dir / "last"
    if not last.is_dir():
        return None
    try:
        state = json.loads((last / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("state.json has no step")
    except (OSError, ValueError) as exc:
        _set_aside(ckpt_dir, f"state.json: {exc}")
        return None
    if state.get("fingerprint") != fp:
        log.warning(
            "checkpoint %s was made with other settings, data or starting weights; removing it "
            "and starting afresh",
            last,
        )
        shutil.rmtree(last)
        return None
    try:
        from loram.models import check_safetensors

        check_safetensors(last / "trainable.safetensors")
        tensors = load_file(str(last / "trainable.safetensors"))
        extra = torch.load(last / "optim.pt", weights_only=True)
    except (ArtifactError, OSError, RuntimeError, ValueError, EOFError) as exc:
        _set_aside(ckpt_dir, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
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
    log.info("resuming from %s at step %d", last, state["step"])
    return int(state["step"]), list(state["history"]), extra


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Reference value of the cosine-with-warm-up schedule (used in tests)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
