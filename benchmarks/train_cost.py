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
step (median over the steps between the first and the last, which writes a checkpoint) and samples/s, and the ratios against ``lora_full``.
Pruned models are prepared once, in their own process, under ``--work``.

    python benchmarks/train_cost.py                        # embedded SmolLM2-135M, 4 x 512
    python benchmarks/train_cost.py --model tiny-llama --steps 3 --seq-len 128
    python benchmarks/train_cost.py --out metrics/bench/train_cost.json

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
SOURCE = {"lora_full": "base", "loram_rand": "rand", "loram_stru": "stru", "qloram_stru": "stru"}


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


def prepare(model: str, work: Path, ratio: float) -> None:
    """Base model dir, and the random- and Taylor-pruned models, under ``work``."""
    import torch

    from loram.models import load_hf_model, load_model, load_tokenizer, save_model_dir
    from loram.pipeline.prune import calibration_batches
    from loram.prune.artifact import save_pruned
    from loram.prune.common import pruned_layers
    from loram.prune.structured import prune_structured

    base = work / "base"
    if not base.is_dir():
        m, tok = load_model(model)
        save_model_dir(m, tok, base, command="base")
    tok = load_tokenizer(base)
    for name, crit in (("rand", "random"), ("stru", "taylor")):
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
        manifest = prune_structured(m, ratio, layers, criterion=crit, calib_batches=calib, seed=0)
        save_pruned(m, manifest, work / name, tokenizer=tok, command="prune")


def run_arm(arm: str, work: Path, steps: int, micro: int, seq_len: int) -> dict:
    import torch

    from loram.config import TrainParams
    from loram.models import default_device, load_hf_model, load_tokenizer
    from loram.quant import parameter_bytes, quantize_nf4
    from loram.train import lora_config
    from loram.trainloop import train_loop

    src = work / SOURCE[arm]
    tok = load_tokenizer(src)
    blocks = _blocks(tok, steps * micro, seq_len)
    device = default_device()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_bytes()
    if (src / "loram_manifest.json").is_file():
        from loram.prune.artifact import load_pruned

        model, _ = load_pruned(src)
    else:
        model = load_hf_model(src)
    p = TrainParams(
        max_steps=steps,
        micro_batch=micro,
        seq_len=seq_len,
        warmup_steps=0,
        save_every=steps,
        eval_every=steps,
        quantize="nf4" if arm.startswith("qloram") else "none",
    )
    if p.quantize == "nf4":
        model = quantize_nf4(model, device=device)
    model.to(device)
    for prm in model.parameters():
        prm.requires_grad_(False)
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(p))
    mem = parameter_bytes(peft_model)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as ckpt:
        t0 = time.perf_counter()
        train_loop(
            peft_model,
            blocks,
            [],
            p,
            ckpt,
            tok.pad_token_id or 0,
            after_step=lambda: stamps.append(time.perf_counter()),
            desc=arm,
        )
    steps_s = [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]
    # The first step warms up; the last one also writes the final checkpoint.
    timed = steps_s[1:-1] if len(steps_s) > 2 else steps_s
    per_step = statistics.median(timed)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    )
    trainable = peft_model.get_nb_trainable_parameters()[0]
    return {
        "arm": arm,
        "params_held": mem["params"] - trainable,
        "param_bytes": mem["base_bytes"] + mem["quantized_bytes"],
        "lora_params": trainable,
        "peak_mib": round(peak / 2**20, 1),
        "peak_kind": "cuda max_memory_allocated" if cuda else "peak RSS above pre-load RSS",
        "seconds_per_step": round(per_step, 3),
        "samples_per_second": round(micro / per_step, 3),
        "steps": steps,
        "micro_batch": micro,
        "seq_len": seq_len,
        "device": device,
    }


# ------------------------------------------------------------------------------- parent


def _table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["arm"] == "lora_full"), rows[0])
    head = (
        f"{'arm':<12} {'params held':>13} {'param MiB':>10} {'peak MiB':>9} {'x mem':>6} "
        f"{'s/step':>7} {'samples/s':>9} {'x speed':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['arm']:<12} {r['params_held']:>13,} {r['param_bytes'] / 2**20:>10.1f} "
            f"{r['peak_mib']:>9,.1f} {r['peak_mib'] / ref['peak_mib']:>6.3f} "
            f"{r['seconds_per_step']:>7.2f} {r['samples_per_second']:>9.3f} "
            f"{r['samples_per_second'] / ref['samples_per_second']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or model dir")
    ap.add_argument("--ratio", type=float, default=0.65)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--work", default=None, help="where the prepared models live (default: temp)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child == "prepare":
        prepare(a.model, Path(a.work), a.ratio)
        return 0
    if a.child:
        print(
            "RESULT "
            + json.dumps(run_arm(a.child, Path(a.work), a.steps, a.micro_batch, a.seq_len))
        )
        return 0
    arms = [x for x in a.arms.split(",") if x]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="loram-bench-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, os.path.abspath(__file__)]
    common = ["--work", str(work), "--model", a.model, "--ratio", str(a.ratio)]
    print(f"preparing the base and the pruned models under {work} ...", flush=True)
    subprocess.run([*me, "--child", "prepare", *common], check=True)
    rows = []
    for arm in arms:
        print(f"arm {arm} ...", flush=True)
        out = subprocess.run(
            [*me, "--child", arm, *common, "--steps", str(a.steps), "--micro-batch",
             str(a.micro_batch), "--seq-len", str(a.seq_len)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT ") :]))
    print(_table(rows))
    if a.out:
        from loram.fsio import atomic_write_json

        ref = next((r for r in rows if r["arm"] == "lora_full"), None)
        result = {
            "model": a.model,
            "ratio": a.ratio,
            "arms": {
                r["arm"]: {
                    **{k: v for k, v in r.items() if k != "arm"},
                    **(
                        {
                            "memory_vs_lora_full": round(r["peak_mib"] / ref["peak_mib"], 4),
                            "speed_vs_lora_full": round(
                                r["samples_per_second"] / ref["samples_per_second"], 4
                            ),
                        }
                        if ref
                        else {}
                    ),
                }
                for r in rows
            },
        }
        atomic_write_json(a.out, result)
        print(f"wrote {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
