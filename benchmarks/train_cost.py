#!/usr/bin/env python
"""Training cost of each arm, side by side: the paper's Table 8 protocol scaled to this machine.

Every arm trains LoRA for a few steps on the SAME samples (instruction rows packed into blocks of
exactly ``--seq-len`` tokens, micro-batch ``--micro-batch``) in a FRESH process, so peak memory
is the arm's own:

* ``lora_full``: peft LoRA on the full original model;
* ``loram_rand`` / ``loram_stru``: LoRA on the model pruned at ``--ratio`` (random / Taylor);
* ``qloram_stru``: the Taylor-pruned model held in NF4 (QLoRAM).

Per arm: parameters held (frozen), their bytes, peak memory (peak RSS of the arm's process above
its RSS just before the model is loaded; ``torch.cuda.max_memory_allocated`` on a GPU), seconds per
step (median over the steps between the first and the last, which writes a checkpoint) and
samples/s, and the ratios against ``lora_full``. On CPU the arms run in lockstep (``--lockstep``):
all their processes are started at once and compute in turns, one step each, so the steps of the
arms are interleaved in time and a slow spell of a shared machine falls on all of them alike.
Pruned models are prepared once, in their own process, under ``--work``.

    python benchmarks/train_cost.py                        # SmolLM2-135M, 4 x 512, 3 runs
    python benchmarks/train_cost.py --model tiny-llama --steps 3 --repeat 1 --seq-len 128
    python benchmarks/train_cost.py --out reports/train_cost.json --also stock   # + stock runs
    python benchmarks/train_cost.py --loss-chunk 0 --no-grad-checkpointing      # other options
    python benchmarks/train_cost.py --analytic path/to/model_dir --ratio 0.85   # floors only

Writes the JSON that ``dvc metrics show`` reads (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("lora_full", "loram_rand", "loram_stru", "qloram_stru")
SOURCE = {
    "lora_full": "base",
    "loram_rand": "rand",
    "loram_stru": "stru",
    "qloram_stru": "stru",
    "lora_small": "small",
}


def _source(arm: str, round_to: int) -> str:
    """The directory under ``--work`` that ``arm`` trains: the pruned ones are named after their
    channel rounding too (``stru`` is the exact ratio, ``stru-round8`` rounds to 8)."""
    name = SOURCE[arm]
    return name if name in ("base", "small") or round_to == 1 else f"{name}-round{round_to}"


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _blocks(tokenizer, n: int, seq_len: int) -> list[dict]:
    """``n`` training blocks of exactly ``seq_len`` tokens from the embedded MBPP rows."""
    from loram.config import SourceParams
    from loram.data import encode_rows, load_rows, pack_examples

    rows = load_rows(SourceParams(kind="embedded", name="mbpp"))
    out: list[dict] = []
    step = 4 * n
    for start in range(0, len(rows), step):
        out += pack_examples(encode_rows(tokenizer, rows[start : start + step], 1 << 30), seq_len)
        if len(out) >= n:
            return out[:n]
    raise SystemExit(f"only {len(out)} blocks of {seq_len} tokens in the embedded MBPP rows")


# ------------------------------------------------------------------------------- children


def _load_base(model: str, dtype: str, random_init: bool):
    """``(model, tokenizer)``: loaded as the pipeline's ``base`` stage would, or, with
    ``random_init``, built from the directory's ``config.json`` with seeded random weights and
    its tokenizer (memory and speed do not depend on the values: for a machine the weights cannot
    reach)."""
    if not random_init:
        from loram.models import load_model

        return load_model(model, dtype=dtype)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loram.models import load_tokenizer, resolve_dtype

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model)
    m = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    return m.eval(), load_tokenizer(model)


def prepare(
    model: str,
    work: Path,
    ratio: float,
    small: str | None = None,
    dtype: str = "float32",
    random_init: bool = False,
    round_to: int = 1,
) -> None:
    """Base model dir, the random- and Taylor-pruned models (kept MLP channels rounded to a
    multiple of ``round_to``) and the smaller model under ``work``, in ``dtype``."""
    import torch

    from loram.models import load_hf_model, load_tokenizer, save_model_dir
    from loram.pipeline.prune import calibration_batches
    from loram.prune.artifact import save_pruned
    from loram.prune.common import pruned_layers
    from loram.prune.structured import prune_structured

    base = work / "base"
    if not base.is_dir():
        m, tok = _load_base(model, dtype, random_init)
        save_model_dir(m, tok, base, command="base")
    if small and not (work / "small").is_dir():
        m, tok = _load_base(small, dtype, random_init)
        save_model_dir(m, tok, work / "small", command="base")
    tok = load_tokenizer(base)
    for arm, crit in (("loram_rand", "random"), ("loram_stru", "taylor")):
        name = _source(arm, round_to)
        if (work / name).is_dir():
            continue
        m = load_hf_model(base)
        layers = pruned_layers(m.config.num_hidden_layers, None, None)
        calib = None
        if crit == "taylor":
            from loram.config import SourceParams
            from loram.data import load_rows

            rows = load_rows(SourceParams(kind="embedded", name="mbpp"))
            calib = calibration_batches(tok, rows, 16, 256, 0)
        torch.manual_seed(0)
        if crit == "taylor" and torch.cuda.is_available():
            m.to("cuda")  # the importance's forward + backward; results are saved from the CPU
        manifest = prune_structured(
            m, ratio, layers, criterion=crit, calib_batches=calib, seed=0, round_to=round_to
        )
        save_pruned(m.to("cpu"), manifest, work / name, tokenizer=tok, command="prune")


def _saved_activation_bytes(
    model, batch, device, chunk: int, fused: bool = True
) -> tuple[int, int]:
    """Bytes autograd keeps for the backward pass of one micro-batch (forward + backward run
    once, gradients then dropped): ``(activations, logits)``, the latter the saved tensors whose
    last dimension is the vocabulary. Parameters are not counted; storages are counted once.
    Inside checkpointed regions (decoder layers with grad checkpointing, loss chunks) torch's
    own hooks keep nothing but the region's inputs: those are counted by :func:`_analytic`."""
    import torch

    from loram.loss import batch_loss

    vocab = model.get_output_embeddings().weight.shape[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (t.untyped_storage().nbytes(), t.dim() > 0 and t.shape[-1] == vocab)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = batch_loss(model, batch, device, chunk, fused=fused)
    loss.backward()
    model.zero_grad(set_to_none=True)
    acts = sum(b for b, is_logits in seen.values() if not is_logits)
    logits = sum(b for b, is_logits in seen.values() if is_logits)
    return acts, logits


def _analytic(cfg, p, n_tokens: int, micro: int, act_bytes: int, trainable: int) -> dict:
    """Analytic sizes (bytes) of what training must hold besides the frozen weights.

    * ``trainable_state``: LoRA weights, their gradients and AdamW's two moments (fp32): 16 B
      per trainable parameter;
    * ``layer_inputs``: with grad checkpointing, each decoder layer's input is kept
      (layers x tokens x hidden x dtype bytes);
    * ``loss_transient``: the fp32 scores the loss needs at once: logits, their softmax and its
      gradient, over every position (stock loss) or one chunk (chunked loss);
    * ``floor``: the limit for the setting: weights + trainable state + what activations any
      backward needs (checkpointed layer inputs, one layer's activations recomputed, one loss
      chunk): nothing that a better implementation of the same training could drop.
    """
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    vocab = cfg.vocab_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    b = act_bytes
    layer_in = layers * n_tokens * h * b
    # one layer's forward intermediates (norms, q/k/v/o, attention output, gate/up/act/product),
    # the LoRA inputs (dropout copies of 7 projection inputs) and the residual stream
    one_layer = n_tokens * b * (4 * h + 2 * (heads * hd + 2 * kv * hd) + 4 * inter + 7 * h)
    chunk_rows = n_tokens if not p.loss_chunk else min(p.loss_chunk, n_tokens)
    loss_transient = 3 * chunk_rows * vocab * 4
    floor_chunk = min(256, n_tokens)
    return {
        "trainable_state": 16 * trainable,
        "layer_inputs": layer_in if p.grad_checkpointing else 0,
        "loss_transient": loss_transient,
        "floor_activations": layer_in + one_layer + 3 * floor_chunk * vocab * 4,
    }


def step_flops(model, micro: int, seq_len: int, labelled: float, p) -> dict:
    """Floating-point operations of one LoRA training step of ``model`` (frozen base, real or
    meta, peft-wrapped or not), counted from its module shapes: the FLOP bound of the arm.

    * decoder projections (frozen): forward ``2 T in out``, backward the input gradient only
      (the same again), plus one more forward per recomputed layer with grad checkpointing;
    * LoRA A and B: forward, input and weight gradients (three times ``2 T r (in + out)``);
    * attention scores: ``QK^T`` and ``AV`` over the causal half, ``2 B S^2 q_width`` forward,
      twice that backward;
    * ``lm_head``: over every position (stock loss) or the labelled ones only (chunked loss):
      forward and input gradient, plus a recomputation of each chunk's logits in the backward
      pass unless the loss is fused (``loss_fused`` and a frozen plain ``nn.Linear`` head).

    Norms, activations, rotary and the optimizer are memory-bound and left out: the bound is what
    the matrix products alone allow. ``T = micro x seq_len`` tokens, ``labelled``: how many of
    them carry a label.
    """
    from torch import nn

    from loram.memory import decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_tok = micro * seq_len
    recompute = 1 if p.grad_checkpointing else 0
    proj = lora = q_width = 0
    for layer in decoder_layers(base):
        for name, m in layer.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if ".lora_" in f".{name}":
                lora += m.in_features * m.out_features
            else:
                proj += m.in_features * m.out_features
                if name.endswith("q_proj") or name.endswith("q_proj.base_layer"):
                    q_width += m.out_features
    head = base.get_output_embeddings()
    fused = p.loss_fused and type(head) is nn.Linear and not getattr(p, "lm_head", False)
    head = getattr(head, "base_layer", head)
    rows = labelled if p.loss_chunk else n_tok
    head_passes = 2 if not p.loss_chunk or fused else 3
    parts = {
        "projections": 2 * n_tok * proj * (2 + recompute),
        "lora": 2 * n_tok * lora * (3 + recompute),
        "attention": 2 * micro * seq_len**2 * q_width * (3 + recompute),
        "lm_head": 2 * rows * head.in_features * head.out_features * head_passes,
    }
    return {**parts, "total": sum(parts.values())}


_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm"}


def _kernel_seconds(model, batch: dict, device: str, p) -> dict:
    """One more forward + backward of ``batch`` under ``torch.profiler`` (CPU), its time split
    into matrix products, attention kernels and everything else (elementwise passes, copies,
    dequantization, autograd and allocator overhead), as self CPU seconds of the ops, and the
    step's wall time (``wall``; ``wall - total`` is what happened between ops)."""
    from torch.profiler import ProfilerActivity, profile

    from loram.loss import batch_loss

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        loss, _ = batch_loss(model, batch, device, p.loss_chunk, fused=p.loss_fused)
        loss.backward()
        wall = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        name = e.key
        if name in _MATMUL_OPS:
            part = "matmul"
        elif "scaled_dot_product" in name or "flash_attention" in name:
            part = "attention"
        else:
            part = "other"
        parts[part] += e.self_cpu_time_total / 1e6
    out = {k: round(v, 3) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()), 3)
    # the profiled step's wall time: what no op accounts for (Python and autograd between ops,
    # the profiler's own cost) is the difference
    out["wall"] = round(wall, 3)
    return out


def _import_libraries() -> None:
    """Import everything an arm's training imports (peft, bitsandbytes, the model classes), so
    that the RSS of library code is in every arm's pre-load RSS rather than in some arms' peaks
    (bitsandbytes, imported only by the NF4 arm, is a few hundred MiB on CPU)."""
    import importlib

    for name in ("peft", "bitsandbytes", "transformers.models.llama.modeling_llama",
                 "transformers.models.qwen2.modeling_qwen2", "safetensors.torch"):  # fmt: skip
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - optional (bitsandbytes: the quant extra)
            pass


class Gate:
    """A child's side of lockstep running: it computes only between the coordinator's ``go``
    (a line on ``read_fd``) and its own ``done`` (a line on ``write_fd``), so the arms' steps
    take turns on the machine instead of one arm's steps all running before the next arm's."""

    def __init__(self, read_fd: int, write_fd: int):
        self._r = os.fdopen(read_fd, "r")
        self._w = os.fdopen(write_fd, "w")

    def wait(self) -> None:
        if self._r.readline() != "go\n":
            raise SystemExit("lockstep: the coordinator went away")

    def done(self) -> None:
        self._w.write("done\n")
        self._w.flush()


def run_arm(
    arm: str,
    work: Path,
    steps: int,
    micro: int,
    seq_len: int,
    opts: dict,
    kernels: bool = False,
    round_to: int = 1,
    gate: Gate | None = None,
) -> dict:
    """One arm's run. With ``gate`` (lockstep) the run is cut into turns: loading and the
    activation probe, then each step, then the rest (the checkpoint, the peak, the profile);
    each turn starts at the coordinator's ``go`` and ends with ``done``. A step's time is
    measured from its ``go`` to its end, so the time spent waiting for a turn is not counted."""
    if gate is not None:
        gate.wait()
    import torch

    from loram.config import TrainParams
    from loram.data import collate
    from loram.models import default_device, load_hf_model, load_tokenizer
    from loram.quant import parameter_bytes
    from loram.train import attn_implementation, bound_training_heap, prepare_lora_model
    from loram.trainloop import train_loop

    src = work / _source(arm, round_to)
    tok = load_tokenizer(src)
    blocks = _blocks(tok, steps * micro, seq_len)
    device = default_device()
    _import_libraries()  # library code is not the arm's memory: loaded before rss0
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    p = TrainParams(
        max_steps=steps,
        micro_batch=micro,
        seq_len=seq_len,
        warmup_steps=0,
        save_every=steps,
        eval_every=steps,
        quantize="nf4" if arm.startswith("qloram") else "none",
        **opts,
    )
    bound_training_heap(p)  # as the training stage: before the model is loaded
    rss0 = _rss_bytes()
    if (src / "loram_manifest.json").is_file():
        from loram.prune.artifact import load_pruned

        model, _ = load_pruned(src)
    else:
        model = load_hf_model(src)
    peft_model = prepare_lora_model(model, p, device)
    mem = parameter_bytes(peft_model)
    trainable = peft_model.get_nb_trainable_parameters()[0]
    pad = tok.pad_token_id or 0
    peft_model.train()
    acts, logits = _saved_activation_bytes(
        peft_model, collate(blocks[:micro], pad), device, p.loss_chunk, p.loss_fused
    )
    # monotonic clock, the same in every process: lockstep turns can be checked for overlap
    begins: list[float] = []
    ends: list[float] = []

    def after_step() -> None:
        ends.append(time.monotonic())
        if gate is not None:
            gate.done()  # the step's turn ends; the next one (or the finish) starts at go
            gate.wait()
        begins.append(time.monotonic())

    if gate is not None:
        gate.done()
        gate.wait()
    with tempfile.TemporaryDirectory() as ckpt:
        begins.append(time.monotonic())
        train_loop(peft_model, blocks, [], p, ckpt, pad, after_step=after_step, desc=arm)
    from loram import block_cache

    cache_on = block_cache.installed() if p.block_cache and p.heap_mmap_threshold else False
    cache_stats = block_cache.stats() if cache_on else None
    steps_s = [e - b for b, e in zip(begins, ends)]
    # The first step warms up; the last one is followed by the final checkpoint (excluded too).
    timed = steps_s[1:-1] if len(steps_s) > 2 else steps_s
    per_step = statistics.median(timed)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    )
    # after the peak is read: the profiler's own memory is not the arm's
    split = None
    if kernels and not cuda:
        split = _kernel_seconds(peft_model, collate(blocks[:micro], pad), device, p)
    labelled = sum(sum(1 for v in b["labels"][1:] if v != -100) for b in blocks) / steps
    flops = step_flops(peft_model, micro, seq_len, labelled, p)
    cfg = peft_model.get_base_model().config
    act_dtype = next(x for x in peft_model.parameters() if x.is_floating_point()).dtype
    ana = _analytic(cfg, p, micro * seq_len, micro, torch.finfo(act_dtype).bits // 8, trainable)
    weights = mem["base_bytes"] + mem["quantized_bytes"]
    saved = acts + ana["layer_inputs"]
    # what the peak holds besides weights, trainable state and saved activations: transient
    # tensors of the backward pass (the loss's among them), recomputation, allocator and
    # library overhead
    runtime = peak - weights - ana["trainable_state"] - saved - logits
    floor = weights + ana["trainable_state"] + ana["floor_activations"]
    mib = 2**20
    return {
        "arm": arm,
        "params_held": mem["params"] - trainable,
        "param_bytes": weights,
        "lora_params": trainable,
        "peak_mib": round(peak / mib, 1),
        "peak_kind": "cuda max_memory_allocated" if cuda else "peak RSS above pre-load RSS",
        "seconds_per_step": round(per_step, 3),
        "samples_per_second": round(micro / per_step, 3),
        "breakdown_mib": {
            "weights": round(weights / mib, 1),
            "trainable_state": round(ana["trainable_state"] / mib, 1),
            "activations": round(saved / mib, 1),
            "logits_loss": round(logits / mib, 1),
            "loss_transient_est": round(ana["loss_transient"] / mib, 1),
            "runtime": round(runtime / mib, 1),
        },
        "floor_mib": round(floor / mib, 1),
        "peak_vs_floor": round(peak / floor, 3),
        "flops_per_step": flops["total"],
        "gflop_per_step": round(flops["total"] / 1e9, 1),
        "gflop_per_step_parts": {k: round(v / 1e9, 1) for k, v in flops.items() if k != "total"},
        "gflop_per_second": round(flops["total"] / 1e9 / per_step, 2),
        "kernel_seconds": split,
        "loss_chunk": p.loss_chunk,
        "loss_fused": p.loss_fused,
        "dropout_rng": p.dropout_rng,
        "grad_checkpointing": p.grad_checkpointing,
        "attn_implementation": attn_implementation(peft_model),
        "heap_mmap_threshold": p.heap_mmap_threshold,
        "block_cache": cache_on,
        "block_cache_stats": cache_stats,
        "optimizer": p.optimizer,
        "steps": steps,
        "step_seconds": [round(x, 3) for x in steps_s],
        "step_spans": [[round(b, 3), round(e, 3)] for b, e in zip(begins, ends)],
        "lockstep": gate is not None,
        "micro_batch": micro,
        "seq_len": seq_len,
        "device": device,
    }


def _child_result(label: str, code: int, stdout: str, stderr: str) -> dict:
    if code != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"arm {label} failed (exit {code})")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _collect(label: str, proc, out, err, died: bool = False) -> dict:
    """A lockstep child's result once it has exited (its output files read from the start).
    ``died``: it left before its turns were over, a failure even with exit status 0."""
    proc.wait()
    out.seek(0)
    err.seek(0)
    code = proc.returncode or (1 if died else 0)
    return _child_result(label, code, out.read(), err.read())


def run_child(label: str, cmd: list[str], env: dict) -> dict:
    """One arm in a fresh process, alone on the machine."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return _child_result(label, out.returncode, out.stdout, out.stderr)


def run_lockstep(cmds: dict[str, list[str]], steps: int, env: dict) -> dict[str, dict]:
    """The arms in fresh processes of their own, all started at once but computing in turns: every
    arm loads, then every arm runs its step 1, then every arm its step 2, ... and finishes. Only
    one arm computes at any time (the others wait on a pipe, idle), so each arm's peak memory is
    its own as in separate runs, while the arms' steps are interleaved in time: a slow spell of a
    shared machine falls on every arm's steps alike instead of on one arm's whole run. All the
    arms' memory is resident at once."""
    kids = []
    try:
        for label, cmd in cmds.items():
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            out = tempfile.TemporaryFile(mode="w+")  # files, not pipes: no child blocks on output
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(
                [*cmd, "--gate", f"{go_r},{done_w}"],
                stdout=out, stderr=err, text=True, env=env, pass_fds=(go_r, done_w),
            )  # fmt: skip
            os.close(go_r)
            os.close(done_w)
            kids.append((label, proc, os.fdopen(go_w, "w"), os.fdopen(done_r, "r"), out, err))
        # turns: loading, each step, then the finish (checkpoint, peak, profile, exit)
        for turn in range(steps + 2):
            first = turn % len(kids)  # each arm in its turn goes first: no arm always follows
            for label, proc, go, done, out, err in kids[first:] + kids[:first]:
                go.write("go\n")
                go.flush()
                if turn <= steps and done.readline() != "done\n":
                    _collect(label, proc, out, err, died=True)  # raises with its stderr
                if turn == steps + 1:
                    proc.wait()
        return {label: _collect(label, proc, out, err) for label, proc, _, _, out, err in kids}
    finally:
        for _, proc, go, done, out, err in kids:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (go, done, out, err):
                f.close()


def analytic_arms(
    config, ratio: float, micro: int, seq_len: int, dtype_bytes: int, p, round_to: int = 1
) -> dict[str, dict]:
    """The floor of each arm from a config alone (meta models, no weights): frozen weight bytes
    (NF4 projections at 0.5 B + one 8-bit absmax per 64 weights, the rest in the base dtype, as
    :func:`loram.quant.quantize_nf4` holds them), LoRA state and the activation floor of
    :func:`_analytic`. For models too large to train here."""
    from torch import nn

    from loram.memory import decoder_layers, pruned_meta_model

    n_tokens = micro * seq_len
    out = {}
    for arm, method, nf4 in (("lora_full", "none", False), ("loram_stru", "structured", False),
                             ("qloram_stru", "structured", True)):  # fmt: skip
        model, _ = pruned_meta_model(
            config, method, ratio if method != "none" else 0.0, round_to=round_to
        )
        projections = [
            m
            for layer in decoder_layers(model)
            for m in layer.modules()
            if isinstance(m, nn.Linear) and m.weight.shape.numel() > 0
        ]
        proj = sum(m.weight.numel() for m in projections)
        total = sum(q.numel() for q in model.parameters())
        if nf4:
            weights = (total - proj) * dtype_bytes + proj // 2 + proj // 64
        else:
            weights = total * dtype_bytes
        lora = sum(p.r * (m.in_features + m.out_features) for m in projections)
        ana = _analytic(model.config, p, n_tokens, micro, dtype_bytes, lora)
        floor = weights + ana["trainable_state"] + ana["floor_activations"]
        flops = step_flops(model, micro, seq_len, n_tokens, p)["total"]
        out[arm] = {"params_held": total, "param_bytes": weights, "lora_params": lora,
                    "floor_mib": round(floor / 2**20, 1), "flops_per_step": flops,
                    "gflop_per_step": round(flops / 1e9, 1)}  # fmt: skip
    for r in out.values():
        r["floor_vs_lora_full"] = round(r["floor_mib"] / out["lora_full"]["floor_mib"], 4)
        r["flop_bound_vs_lora_full"] = round(
            out["lora_full"]["flops_per_step"] / r["flops_per_step"], 4
        )
    return out


# ------------------------------------------------------------------------------- parent

TARGETS = (
    # (label, arm, quantity, comparison, bound)
    ("ratio: LoRAM-Stru memory <= 0.55x LoRA-full", "loram_stru", "mem", "<=", 0.55),
    ("throughput: LoRAM-Stru samples/s >= 1.5x LoRA-full", "loram_stru", "speed", ">=", 1.5),
    ("QLoRAM-Stru memory <= 0.35x LoRA-full (paper setting: 1.5B, ratio 0.85)",
     "qloram_stru", "mem", "<=", 0.35),
)  # fmt: skip
ABSOLUTE = 0.70  # every arm's peak at most 70% of the same arm's with the stock settings


def _merge_runs(runs: list[dict]) -> dict:
    """One row from repeated runs of an arm (interleaved with the other arms' runs, so a slow
    spell of the machine falls on several arms): the run with the median s/step (the lower
    median of an even count), every run's s/step and peak kept beside it, and the first run's
    kernel split."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["seconds_per_step"])
    row = dict(runs[order[(len(runs) - 1) // 2]])
    row["kernel_seconds"] = runs[0].get("kernel_seconds")
    if len(runs) > 1:
        row["runs"] = len(runs)
        row["seconds_per_step_runs"] = [r["seconds_per_step"] for r in runs]
        row["peak_mib_runs"] = [r["peak_mib"] for r in runs]
    return row


def _table(rows: list[dict]) -> str:
    head = (
        f"{'arm':<20} {'params held':>13} {'param MiB':>10} {'peak MiB':>9} {'x mem':>6} "
        f"{'s/step':>7} {'samples/s':>9} {'x speed':>8} {'x bound':>7} {'GFLOP/s':>7} "
        f"{'floor MiB':>9} {'x floor':>7} {'peak/floor':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['label']:<20} {r['params_held']:>13,} {r['param_bytes'] / 2**20:>10.1f} "
            f"{r['peak_mib']:>9,.1f} {r.get('memory_vs_lora_full', float('nan')):>6.3f} "
            f"{r['seconds_per_step']:>7.2f} {r['samples_per_second']:>9.3f} "
            f"{r.get('speed_vs_lora_full', float('nan')):>8.3f} "
            f"{r.get('flop_bound_vs_lora_full', float('nan')):>7.3f} "
            f"{r.get('gflop_per_second', float('nan')):>7.1f} {r['floor_mib']:>9,.1f} "
            f"{r.get('floor_vs_lora_full', float('nan')):>7.3f} {r['peak_vs_floor']:>10.2f}"
        )
    keys = ("weights", "trainable_state", "activations", "logits_loss", "runtime")
    head2 = f"{'breakdown (MiB)':<20} " + " ".join(f"{k:>15}" for k in keys)
    lines += ["", head2, "-" * len(head2)]
    for r in rows:
        b = r["breakdown_mib"]
        lines.append(f"{r['label']:<20} " + " ".join(f"{b[k]:>15,.1f}" for k in keys))
    timed = [r for r in rows if r.get("kernel_seconds")]
    if timed:
        keys = ("matmul", "attention", "other", "total", "wall")
        head3 = (
            f"{'profiled step (s)':<20} "
            + " ".join(f"{k:>10}" for k in keys)
            + f" {'other %':>8} {'x mm+attn':>10}"
        )
        lines += ["", head3, "-" * len(head3)]
        for r in timed:
            k = r["kernel_seconds"]
            lines.append(
                f"{r['label']:<20} "
                + " ".join(f"{k.get(x, float('nan')):>10.2f}" for x in keys)
                + f" {100 * k['other'] / k['total']:>7.1f}%"
                + f" {r.get('kernel_bound_vs_lora_full', float('nan')):>10.3f}"
            )
    return "\n".join(lines)


def _ratios(rows: list[dict]) -> None:
    """memory / speed vs lora_full of the same settings, and vs the same arm's stock run."""
    by = {r["label"]: r for r in rows}
    for r in rows:
        suffix = r["label"][len(r["arm"]) :]
        ref = by.get("lora_full" + suffix)
        if ref:
            r["memory_vs_lora_full"] = round(r["peak_mib"] / ref["peak_mib"], 4)
            r["speed_vs_lora_full"] = round(r["samples_per_second"] / ref["samples_per_second"], 4)
            r["floor_vs_lora_full"] = round(r["floor_mib"] / ref["floor_mib"], 4)
            if "flops_per_step" in r and "flops_per_step" in ref:
                # the speed the matrix products allow: lora_full's FLOPs over this arm's
                r["flop_bound_vs_lora_full"] = round(ref["flops_per_step"] / r["flops_per_step"], 4)
            mine, theirs = r.get("kernel_seconds"), ref.get("kernel_seconds")
            if mine and theirs:
                # the speed the matrix products and attention allow at the rate they ran here
                r["kernel_bound_vs_lora_full"] = round(
                    (theirs["matmul"] + theirs["attention"]) / (mine["matmul"] + mine["attention"]),
                    4,
                )
        stock = by.get(r["arm"] + "@stock")
        if stock and stock is not r:
            r["memory_vs_stock"] = round(r["peak_mib"] / stock["peak_mib"], 4)
            r["speed_vs_stock"] = round(r["samples_per_second"] / stock["samples_per_second"], 4)


def _targets(rows: list[dict]) -> list[dict]:
    by = {r["label"]: r for r in rows}
    out = []
    for label, arm, qty, op, bound in TARGETS:
        r = by.get(arm)
        key = "memory_vs_lora_full" if qty == "mem" else "speed_vs_lora_full"
        if r is None or key not in r:
            continue
        v = r[key]
        t = {"target": label, "value": v, "holds": v <= bound if op == "<=" else v >= bound}
        if qty == "speed" and "flop_bound_vs_lora_full" in r:
            t["flop_bound"] = r["flop_bound_vs_lora_full"]
        if qty == "speed" and "kernel_bound_vs_lora_full" in r:
            t["kernel_bound"] = r["kernel_bound_vs_lora_full"]
        out.append(t)
    for r in rows:
        if "memory_vs_stock" in r and r["label"] == r["arm"]:
            v = r["memory_vs_stock"]
            out.append(
                {
                    "target": f"absolute: {r['arm']} memory <= {ABSOLUTE}x its stock run",
                    "value": v,
                    "holds": v <= ABSOLUTE,
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    from typing import get_args

    from loram.config import Optimizer, PruneParams, TrainParams

    d = TrainParams()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or model dir")
    ap.add_argument(
        "--small-model", default=None, help="also LoRA on this smaller model (arm lora_small)"
    )
    ap.add_argument("--ratio", type=float, default=0.65)
    ap.add_argument(
        "--round-to",
        type=int,
        default=PruneParams().round_to,
        help="prune.round_to: the pruned arms keep a multiple of this many MLP channels "
        "(1: the ratio's exact count)",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="the base weights' dtype (base.dtype); bfloat16 is the paper's on GPUs",
    )
    ap.add_argument(
        "--random-init",
        action="store_true",
        help="--model / --small-model are directories with a config.json and a tokenizer but "
        "no weights: weights are drawn at random (seeded); memory and speed do not depend on them",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=8,
        help="optimizer steps per arm; the first and the last are not timed (default 8: 6 timed)",
    )
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="N",
        help="run every arm N times, interleaved (all arms, then all again): each arm's row is "
        "its run with the median s/step, and the JSON keeps every run's s/step and peak "
        "(default 3)",
    )
    ap.add_argument(
        "--loss-chunk", type=int, default=d.loss_chunk, help="train.loss_chunk (0: stock loss)"
    )
    ap.add_argument(
        "--loss-fused",
        action=argparse.BooleanOptionalAction,
        default=d.loss_fused,
        help="train.loss_fused (a frozen head's chunk gradients taken in the forward pass)",
    )
    ap.add_argument(
        "--dropout-rng",
        choices=("torch", "packed"),
        default=d.dropout_rng,
        help="train.dropout_rng (how LoRA dropout masks are drawn on CPU)",
    )
    ap.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=d.grad_checkpointing,
        help="train.grad_checkpointing",
    )
    ap.add_argument(
        "--attn-implementation",
        choices=("sdpa", "eager"),
        default=d.attn_implementation,
        help="train.attn_implementation",
    )
    ap.add_argument(
        "--optimizer",
        choices=get_args(Optimizer),
        default=d.optimizer,
        help="train.optimizer (AdamW's implementation)",
    )
    ap.add_argument(
        "--also",
        default="",
        help="comma-separated settings to run every arm with as well, in the same run: stock "
        "(full-logits loss, no checkpointing, glibc's heap: each arm's memory is also reported "
        "against it), loss_only (the --loss-chunk loss, no checkpointing), ckpt_only "
        "(checkpointing, stock loss), bounded_heap (heap_mmap_threshold 131072 without the block "
        "cache), block_cache (heap_mmap_threshold 131072 with it), glibc_heap "
        "(heap_mmap_threshold 0: glibc's dynamic threshold), unfused (loss_fused false: every "
        "loss chunk recomputed in the backward pass), packed_dropout / torch_dropout "
        "(train.dropout_rng), foreach_optimizer / fused_optimizer (train.optimizer)",
    )
    ap.add_argument("--compare-stock", action="store_true", help="the same as --also stock")
    ap.add_argument(
        "--analytic",
        default=None,
        metavar="CONFIG",
        help="only print the analytic floor of each arm for this config (a model dir or a "
        "loram memory config name): no model is loaded",
    )
    ap.add_argument(
        "--dtype-bytes", type=int, default=4, help="--analytic: bytes per base weight (4: fp32)"
    )
    ap.add_argument(
        "--heap-mmap-threshold",
        type=int,
        default=d.heap_mmap_threshold,
        metavar="BYTES",
        help="train.heap_mmap_threshold (CPU, glibc: tensors of at least BYTES are mapped and "
        "returned to the system when freed; 0: glibc's dynamic threshold)",
    )
    ap.add_argument(
        "--kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: profile one more forward + backward per arm (after its peak is read) and "
        "split its time into matrix products, attention and the rest; the speed the first two "
        "allow is printed beside the FLOP bound",
    )
    ap.add_argument(
        "--block-cache",
        action=argparse.BooleanOptionalAction,
        default=d.block_cache,
        help="train.block_cache (CPU: tensors of at least --heap-mmap-threshold bytes come from "
        "loram's block cache, which reuses freed blocks instead of faulting fresh pages in)",
    )
    ap.add_argument(
        "--stages",
        default=None,
        metavar="MODELS",
        help="also time the offline stages, alignment and evaluation on these models "
        "(benchmarks/stage_cost.py --models MODELS; e.g. tiny-llama,smollm2-135m)",
    )
    ap.add_argument("--work", default=None, help="where the prepared models live (default: temp)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--lockstep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the arms of a setting in lockstep: each in its own fresh process (peak memory "
        "its own), computing in turns, one step each, so the arms' steps are interleaved in time "
        "and a slow spell of the machine falls on all arms alike; all the arms' memory is "
        "resident at once, so settings on glibc's heap (stock, glibc_heap), whose processes "
        "keep what they freed, run one arm after another (default: on CPU yes, on a GPU no)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gate", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--opts", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "prepare":
        prepare(a.model, Path(a.work), a.ratio, a.small_model, a.dtype, a.random_init, a.round_to)
        return 0
    if a.child:
        opts = json.loads(a.opts)
        res = run_arm(
            a.child,
            Path(a.work),
            a.steps,
            a.micro_batch,
            a.seq_len,
            opts,
            kernels=a.kernels,
            round_to=a.round_to,
            gate=Gate(*map(int, a.gate.split(","))) if a.gate else None,
        )
        # also kept under --work: an interrupted run still leaves the arms it measured
        from loram.fsio import atomic_write_json

        label = a.child + "".join(f"-{k}={v}" for k, v in sorted(opts.items()))
        (Path(a.work) / "results").mkdir(exist_ok=True)
        atomic_write_json(Path(a.work) / "results" / f"{label}.json", res)
        print("RESULT " + json.dumps(res))
        return 0
    if a.analytic:
        from loram.memory import load_config

        p = TrainParams(
            loss_chunk=a.loss_chunk,
            loss_fused=a.loss_fused,
            grad_checkpointing=a.grad_checkpointing,
        )
        res = analytic_arms(
            load_config(a.analytic),
            a.ratio,
            a.micro_batch,
            a.seq_len,
            a.dtype_bytes,
            p,
            a.round_to,
        )
        print(f"analytic floors: {a.analytic}, ratio {a.ratio}, {a.micro_batch} x {a.seq_len}, "
              f"{a.dtype_bytes} B weights")  # fmt: skip
        for arm, r in res.items():
            print(f"{arm:<12} params {r['params_held']:>14,}  weights "
                  f"{r['param_bytes'] / 2**20:>10,.1f} MiB  floor {r['floor_mib']:>10,.1f} MiB  "
                  f"x {r['floor_vs_lora_full']:.3f}  GFLOP/step {r['gflop_per_step']:>9,.1f}  "
                  f"speed bound x {r['flop_bound_vs_lora_full']:.3f}")  # fmt: skip
        if a.out:
            from loram.fsio import atomic_write_json

            atomic_write_json(
                a.out,
                {"config": a.analytic, "ratio": a.ratio, "round_to": a.round_to, "arms": res},
            )
        return 0
    arms = [x for x in a.arms.split(",") if x]
    if a.small_model and "lora_small" not in arms:
        arms.append("lora_small")
    bad = [x for x in arms if x not in ARMS + ("lora_small",)]
    if bad:
        ap.error(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}, lora_small")
    if "lora_small" in arms and not a.small_model:
        ap.error("arm lora_small needs --small-model")
    if a.loss_chunk < 0:
        ap.error(f"--loss-chunk must be >= 0, got {a.loss_chunk}")
    if a.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {a.repeat}")
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="loram-bench-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, os.path.abspath(__file__)]
    common = ["--work", str(work), "--model", a.model, "--ratio", str(a.ratio)]
    common += ["--round-to", str(a.round_to)]
    common += ["--dtype", a.dtype] + (["--random-init"] if a.random_init else [])
    if a.small_model:
        common += ["--small-model", a.small_model]
    print(f"preparing the base and the pruned models under {work} ...", flush=True)
    subprocess.run([*me, "--child", "prepare", *common], check=True)
    chosen = {
        "loss_chunk": a.loss_chunk,
        "loss_fused": a.loss_fused,
        "dropout_rng": a.dropout_rng,
        "grad_checkpointing": a.grad_checkpointing,
        "attn_implementation": a.attn_implementation,
        "heap_mmap_threshold": a.heap_mmap_threshold,
        "block_cache": a.block_cache,
        "optimizer": a.optimizer,
    }
    presets = {
        "stock": {"loss_chunk": 0, "grad_checkpointing": False, "heap_mmap_threshold": 0},
        "bounded_heap": {"heap_mmap_threshold": 131072, "block_cache": False},
        "block_cache": {"heap_mmap_threshold": 131072, "block_cache": True},
        "glibc_heap": {"heap_mmap_threshold": 0},
        "unfused": {"loss_fused": False},
        "packed_dropout": {"dropout_rng": "packed"},
        "torch_dropout": {"dropout_rng": "torch"},
        "foreach_optimizer": {"optimizer": "foreach"},
        "fused_optimizer": {"optimizer": "fused"},
        "loss_only": {"loss_chunk": a.loss_chunk or 256, "grad_checkpointing": False},
        "ckpt_only": {"loss_chunk": 0, "grad_checkpointing": True},
    }
    also = [x for x in a.also.split(",") if x] + (["stock"] if a.compare_stock else [])
    bad = [x for x in also if x not in presets]
    if bad:
        ap.error(f"unknown --also setting(s) {bad}; choose from {', '.join(presets)}")
    settings = [("", chosen)] + [
        (f"@{name}", {**chosen, **presets[name]}) for name in dict.fromkeys(also)
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # params decide
    if a.lockstep is None:
        import torch

        a.lockstep = not torch.cuda.is_available()
    runs: dict[str, list[dict]] = {}
    for rep in range(a.repeat):
        for suffix, opts in settings:
            tag = f" (run {rep + 1} of {a.repeat})" if a.repeat > 1 else ""
            # the kernel split is profiled once per arm, in its first run
            prof = ["--kernels" if a.kernels and rep == 0 else "--no-kernels"]
            cmds = {
                arm + suffix: [*me, "--child", arm, *common, *prof, "--steps", str(a.steps),
                               "--micro-batch", str(a.micro_batch), "--seq-len", str(a.seq_len),
                               "--opts", json.dumps(opts)]
                for arm in arms
            }  # fmt: skip
            # glibc's heap keeps what a process freed: a whole group's stock runs resident at
            # once would not fit where one at a time does, so those run one after another
            if a.lockstep and opts["heap_mmap_threshold"] > 0:
                print(f"arms {', '.join(cmds)}{tag}, in lockstep, {opts} ...", flush=True)
                results = run_lockstep(cmds, a.steps, env)
            else:
                results = {}
                for label, cmd in cmds.items():
                    print(f"arm {label}{tag} {opts} ...", flush=True)
                    results[label] = run_child(label, cmd, env)
            for label, res in results.items():
                runs.setdefault(label, []).append(res)
    rows = [{**_merge_runs(rs), "label": label} for label, rs in runs.items()]
    _ratios(rows)
    targets = _targets(rows)
    import platform

    import torch

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    weights = a.dtype + (", random weights" if a.random_init else "")
    print(f"\n{a.model} ({weights}), ratio {a.ratio} (round_to {a.round_to}), micro-batch {a.micro_batch} x {a.seq_len} "
          f"tokens, {a.steps} steps; {stamp}; {machine}; options {chosen}")  # fmt: skip
    print(_table(rows))
    spread = [r for r in rows if r.get("runs")]
    if spread:
        print()
        for r in spread:
            secs = ", ".join(f"{x:.2f}" for x in r["seconds_per_step_runs"])
            peaks = ", ".join(f"{x:,.1f}" for x in r["peak_mib_runs"])
            print(f"{r['label']:<20} s/step over {r['runs']} runs: {secs}; peak MiB: {peaks}")
    if targets:
        print()
        for t in targets:
            bound = f" (the FLOPs allow {t['flop_bound']:.3f}" if "flop_bound" in t else ""
            if "kernel_bound" in t:
                bound += (
                    f"; its matrix products and attention, at the rate they ran, allow "
                    f"{t['kernel_bound']:.3f}"
                )
            bound += ")" if bound else ""
            print(f"{'HOLDS' if t['holds'] else 'MISSES'}  {t['target']}: {t['value']:.3f}{bound}")
    if a.out:
        from loram.fsio import atomic_write_json

        result = {
            "model": a.model,
            "dtype": a.dtype,
            "random_init": a.random_init,
            "small_model": a.small_model,
            "ratio": a.ratio,
            "round_to": a.round_to,
            "date": stamp,
            "machine": machine,
            "options": chosen,
            "arms": {r["label"]: {k: v for k, v in r.items() if k != "label"} for r in rows},
            "targets": targets,
        }
        atomic_write_json(a.out, result)
        print(f"wrote {a.out}")
    if tmp is not None:
        tmp.cleanup()
    if a.stages:
        cmd = [sys.executable, str(Path(__file__).with_name("stage_cost.py")), "--models", a.stages]
        if a.out:
            cmd += ["--out", str(Path(a.out).with_name(Path(a.out).stem + "_stages.json"))]
        print(f"\nstage costs: {' '.join(cmd)}", flush=True)
        return subprocess.run(cmd).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
