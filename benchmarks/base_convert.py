#!/usr/bin/env python
"""Peak memory and time of the ``base`` conversion: streamed (tensor by tensor, the stage's
path) against loading the whole model with transformers, each in a fresh process.

Per mode: peak RSS of the converting process (``wait4``'s ``ru_maxrss``), seconds, shards
written; then whether the two outputs hold the same tensors bit for bit (compared one tensor at
a time). Heavy for real models: run under ``flock /tmp/loram-heavy.lock`` on a shared machine.

    python benchmarks/base_convert.py --model qwen2.5-coder-1.5b --dtype bfloat16
    python benchmarks/base_convert.py --model smollm2-135m --modes stream
    python benchmarks/base_convert.py --model tiny-llama --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, torch
from loram.convert import convert_model
from loram.models import resolve_dtype
model, out, dtype, stream = sys.argv[1:5]
res = convert_model(model, out, dtype=resolve_dtype(dtype), stream=stream == "stream")
print("RESULT", res.params, res.streamed, len(res.files))
"""


def run_mode(model: str, out: Path, dtype: str, mode: str) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, model, str(out), dtype, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} conversion of {model} failed (exit {status})")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT"))
    _, params, streamed, shards = line.split()
    return {
        "mode": mode,
        "streamed": streamed == "True",
        "params": int(params),
        "shards": int(shards),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "seconds": round(time.time() - t0, 1),
    }


def same_tensors(a: Path, b: Path) -> bool:
    """Same names, dtypes, shapes and values, read one tensor at a time."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as s:
                out.update({k: f for k in s.keys()})
        return out

    wa, wb = where(a), where(b)
    if sorted(wa) != sorted(wb):
        return False
    for k in wa:
        with safe_open(str(wa[k]), "pt") as sa, safe_open(str(wb[k]), "pt") as sb:
            ta, tb = sa.get_tensor(k), sb.get_tensor(k)
            if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="stream,memory", help="stream, memory or both")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    if not modes or set(modes) - {"stream", "memory"}:
        ap.error(f"--modes {a.modes!r}: expected stream, memory or stream,memory")
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        rows = [run_mode(a.model, Path(tmp) / m, a.dtype, m) for m in modes]
        identical = (
            same_tensors(Path(tmp) / "stream", Path(tmp) / "memory") if len(modes) == 2 else None
        )
    print(f"base conversion of {a.model} to {a.dtype} (peak RSS of a fresh process)")
    print(
        f"{'mode':8s} {'streamed':>8s} {'params':>14s} {'shards':>6s} {'peak RSS MiB':>12s} {'s':>7s}"
    )
    for r in rows:
        print(
            f"{r['mode']:8s} {str(r['streamed']):>8s} {r['params']:>14,} {r['shards']:>6d} "
            f"{r['peak_rss_mib']:>12,.0f} {r['seconds']:>7.1f}"
        )
    if identical is not None:
        print(f"tensors bit-identical between the two: {identical}")
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {"model": a.model, "dtype": a.dtype, "modes": rows, "identical": identical},
                indent=2,
            )
            + "\n"
        )
    return 0 if identical in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
