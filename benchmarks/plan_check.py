#!/usr/bin/env python
"""Check ``loram plan`` against measured peaks: run the training-cost benchmark
(``benchmarks/train_cost.py``, each arm in a fresh process, peak RSS above the pre-load RSS on
CPU) for one setting, or read a JSON it wrote, and print predicted vs measured peak per arm.

    python benchmarks/plan_check.py --model smollm2-135m --micro-batch 4 --seq-len 512
    python benchmarks/plan_check.py --json metrics/bench/train_cost.json --work WORK
    python benchmarks/plan_check.py --model M ... -- --loss-chunk 256 --grad-checkpointing

Arguments after ``--`` go to the benchmark unchanged (its memory options); the settings the
benchmark reports per arm (``loss_chunk``, ``grad_checkpointing``, ``attn_implementation``) are
the ones planned. The benchmark's ``--work`` directory (kept here) holds the prepared models;
the planner reads their configs and dtypes. ``--out`` writes the comparison as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ARM_METHOD = {
    "lora_full": ("lora", "base"),
    "loram_rand": ("loram-rand", "base"),
    "loram_stru": ("loram-stru", "base"),
    "qloram_stru": ("qloram-stru", "base"),
    "lora_small": ("lora", "small"),
}
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _artifact_precision(path: Path) -> str:
    from loram.models import artifact_dtype

    return PRECISION[str(artifact_dtype(path)).removeprefix("torch.")]


def predict(arm: str, row: dict, work: Path, ratio: float):
    """The planner's answer for one benchmark arm (its model dir, method, shapes, options)."""
    from loram.plan import Setting, plan

    method, src = ARM_METHOD[arm]
    model_dir = work / src
    setting = Setting(
        method=method,
        ratio=ratio if method != "lora" else None,
        precision=_artifact_precision(model_dir),
        micro_batch=int(row["micro_batch"]),
        seq_len=int(row["seq_len"]),
        grad_checkpointing=bool(row.get("grad_checkpointing", False)),
        loss_chunk=int(row.get("loss_chunk", 0) or 0),
        dropout_rng=row.get("dropout_rng", "torch"),  # (results before it: torch's)
        attention=row.get("attn_implementation", "sdpa"),
        device="cpu" if str(row.get("device", "cpu")).startswith("cpu") else "cuda",
    )
    return plan(model_dir, setting, name=src)


def compare(result: dict, work: Path) -> list[dict]:
    rows = []
    ratio = float(result.get("ratio", 0.65))
    for label, row in result["arms"].items():
        arm = row.get("arm") or next((a for a in ARM_METHOD if label.startswith(a)), None)
        if arm not in ARM_METHOD:
            continue
        p = predict(arm, row, work, ratio)
        measured = float(row["peak_mib"])
        rows.append(
            {
                "arm": label,
                "micro_batch": row["micro_batch"],
                "seq_len": row["seq_len"],
                "loss_chunk": row.get("loss_chunk", 0),
                "grad_checkpointing": row.get("grad_checkpointing", False),
                "measured_mib": measured,
                "predicted_mib": round(p.peak_mib, 1),
                "error": round(p.peak_mib / measured - 1, 4),
                "weights_mib": round(p.weights / 2**20, 1),
                "activations_mib": round(p.activations / 2**20, 1),
                "logits_mib": round(p.logits / 2**20, 1),
                "overhead_mib": round(p.overhead / 2**20, 1),
            }
        )
    return rows


def compare_results(lines: list[str], config: str, ratio: float) -> list[dict]:
    """Rows of ``RESULT {json}`` lines (one arm each: src, method lora | loram | qloram, dtype,
    micro_batch, seq_len, loss_chunk, grad_checkpointing, peak_mib) against the planner on
    ``config`` (the unpruned model's; loram / qloram: random structured pruning at ``ratio``)."""
    from loram.plan import Setting, plan

    methods = {"lora": "lora", "loram": "loram-rand", "qloram": "qloram-rand"}
    rows = []
    for line in lines:
        if not line.startswith("RESULT "):
            continue
        r = json.loads(line[len("RESULT ") :])
        s = Setting(
            method=methods[r["method"]],
            ratio=ratio if r["method"] != "lora" else None,
            precision=PRECISION[r["dtype"].removeprefix("torch.")],
            micro_batch=r["micro_batch"],
            seq_len=r["seq_len"],
            loss_chunk=r["loss_chunk"],
            grad_checkpointing=r["grad_checkpointing"],
            dropout_rng=r.get("dropout_rng", "torch"),
            device="cpu",
        )
        p = plan(config, s)
        rows.append(
            {
                "arm": f"{Path(r['src']).name}:{s.method}",
                "micro_batch": r["micro_batch"],
                "seq_len": r["seq_len"],
                "loss_chunk": r["loss_chunk"],
                "grad_checkpointing": r["grad_checkpointing"],
                "measured_mib": r["peak_mib"],
                "predicted_mib": round(p.peak_mib, 1),
                "error": round(p.peak_mib / r["peak_mib"] - 1, 4),
                "weights_mib": round(p.weights / 2**20, 1),
                "activations_mib": round(p.activations / 2**20, 1),
                "logits_mib": round(p.logits / 2**20, 1),
                "overhead_mib": round(p.overhead / 2**20, 1),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        f"{'arm':<22} {'batch':>9} {'chunk':>5} {'ckpt':>4} {'measured':>9} {'predicted':>9} "
        f"{'error':>7}  {'weights':>8} {'activ.':>8} {'logits':>7} {'overh.':>6}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['arm']:<22} {str(r['micro_batch']) + 'x' + str(r['seq_len']):>9} "
            f"{r['loss_chunk']:>5} {'on' if r['grad_checkpointing'] else 'off':>4} "
            f"{r['measured_mib']:>9,.0f} {r['predicted_mib']:>9,.0f} {r['error']:>+7.1%}  "
            f"{r['weights_mib']:>8,.0f} {r['activations_mib']:>8,.0f} {r['logits_mib']:>7,.0f} "
            f"{r['overhead_mib']:>6,.0f}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--arms", default="lora_full,loram_stru,qloram_stru")
    ap.add_argument("--ratio", type=float, default=0.65)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", default=None, help="the benchmark's work dir (prepared models)")
    ap.add_argument("--results", default=None, help="a log of RESULT lines (one arm each)")
    ap.add_argument("--config", default=None, help="--results: the unpruned model's config")
    ap.add_argument("--json", default=None, help="a JSON the benchmark wrote (skip running it)")
    ap.add_argument("--bench", default=str(Path(__file__).with_name("train_cost.py")))
    ap.add_argument("--python", default=sys.executable, help="interpreter for the benchmark")
    ap.add_argument("--out", default=None, help="write the comparison here (JSON)")
    ap.add_argument(
        "--heap-mmap-threshold",
        type=int,
        default=131072,
        metavar="BYTES",
        help="passed to the benchmark it runs (CPU; train.heap_mmap_threshold): glibc's mmap "
        "threshold fixed, so the peak RSS follows the live tensors the planner counts (README, "
        "'CPU allocator'); 0: glibc's default",
    )
    a = ap.parse_args(argv)
    if a.results:
        if not a.config:
            ap.error("--results needs --config (the unpruned model's config name or dir)")
        lines = Path(a.results).read_text(encoding="utf-8").splitlines()
        rows = compare_results(lines, a.config, a.ratio)
        print(table(rows))
        return 0
    if not a.work:
        ap.error("--work is required (the benchmark's work dir)")
    work = Path(a.work)
    if a.json:
        result = json.loads(Path(a.json).read_text(encoding="utf-8"))
    else:
        work.mkdir(parents=True, exist_ok=True)
        bench_out = work / f"bench-{a.micro_batch}x{a.seq_len}-{os.getpid()}.json"
        cmd = [a.python, a.bench, "--model", a.model, "--arms", a.arms, "--ratio", str(a.ratio)]
        cmd += ["--micro-batch", str(a.micro_batch), "--seq-len", str(a.seq_len)]
        cmd += ["--steps", str(a.steps), "--work", str(work), "--out", str(bench_out)]
        cmd += ["--heap-mmap-threshold", str(a.heap_mmap_threshold)]
        cmd += extra
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        result = json.loads(bench_out.read_text(encoding="utf-8"))
    rows = compare(result, work)
    print(table(rows))
    worst = max((abs(r["error"]) for r in rows), default=0.0)
    print(f"largest |error|: {worst:.1%}")
    if a.out:
        from loram.fsio import atomic_write_json

        atomic_write_json(a.out, {"model": result.get("model"), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
