#!/usr/bin/env python
"""Measure the evaluate stage's cost per document on a model and size ``eval.limit``.

Runs each benchmark on a few documents (``--probe``, per task), prints the wall and process CPU
seconds per document, the standard errors measured, and the projected time of one evaluate
stage and of all ``--arms`` evaluated models at the limits of ``params.yaml`` (or ``--limit``).
The projection uses CPU seconds / torch threads (what the wall time would be on idle cores),
since wall times on a shared machine are inflated by other jobs; still indicative only.

    python scripts/eval_cost.py artifacts/base --probe '{"csr": 20, "gsm8k": 2, "humaneval": 2}'
"""

from __future__ import annotations

import argparse
import json
import math
import time

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an HF model directory (e.g. artifacts/base)")
    ap.add_argument(
        "--probe",
        default='{"csr": 20, "gsm8k": 2, "humaneval": 2}',
        help="documents to time per task (JSON; csr = each CSR task)",
    )
    ap.add_argument("--limit", default=None, help="limits to project (JSON; default params.yaml)")
    ap.add_argument("--arms", type=int, default=5, help="evaluated models in the pipeline")
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args()

    from loram.benchmarks import CSR_TASKS
    from loram.config import EvalParams
    from loram.evaluate.harness import run_benchmarks
    from loram.models import load_hf_model, load_tokenizer

    p = EvalParams(**(yaml.safe_load(open(a.params))["eval"]))
    limit = json.loads(a.limit) if a.limit else dict(p.limit)
    probe = json.loads(a.probe)
    expand = lambda d: {  # noqa: E731
        **{t: d["csr"] for t in CSR_TASKS if "csr" in d},
        **{k: v for k, v in d.items() if k != "csr"},
    }
    probe, limit = expand(probe), expand(limit)
    model = load_hf_model(a.model).eval()
    tok = load_tokenizer(a.model)
    import torch

    threads = torch.get_num_threads()
    per_doc, stderr = {}, {}
    for task, n in probe.items():
        t0, c0 = time.time(), time.process_time()
        res = run_benchmarks(
            model,
            tok,
            tasks=[task],
            limit={task: n},
            batch_size=p.batch_size,
            humaneval_n=p.humaneval_n,
            humaneval_temperature=p.humaneval_temperature,
            seed=p.seed,
            sandbox=p.sandbox,
        )
        dt, cpu = time.time() - t0, time.process_time() - c0
        per_doc[task] = cpu / threads / n
        stderr[task] = {k: round(v, 4) for k, v in res.items() if k.endswith("_stderr")}
        print(
            f"{task:14s} {n:3d} docs  wall {dt:7.1f} s  cpu {cpu:7.1f} s  "
            f"-> {per_doc[task]:6.2f} s/doc on {threads} idle cores  {stderr[task]}",
            flush=True,
        )
    stage = sum(per_doc[t] * limit.get(t, 0) for t in per_doc)
    print(
        f"projected benchmarks per evaluate stage at {limit}: {stage / 60:.1f} min; "
        f"x {a.arms} evaluated models: {a.arms * stage / 60:.1f} min"
    )
    n_csr = [limit[t] for t in CSR_TASKS if t in limit]
    if n_csr:
        worst = math.sqrt(sum(0.25 / n for n in n_csr)) / len(n_csr)
        print(f"CSR mean stderr at most {100 * worst:.2f} points (every accuracy at 50%)")


if __name__ == "__main__":
    main()
