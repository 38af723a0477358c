#!/usr/bin/env python
"""What every other step costs, per model size: the offline stages, alignment and evaluation.

For each model of ``--models`` (an embedded name such as ``tiny-llama`` or ``smollm2-135m``, an
installable name such as ``qwen2.5-coder-0.5b``, or a HF directory), each in FRESH processes:

* ``base``: the conversion into a safetensors directory (``loram base``), seconds;
* ``prune`` with each criterion, ``recover`` and ``merge``: ``benchmarks/offline_memory.py``
  (the project's own CLI stages, streaming), seconds and peak RSS;
* ``align``: full-rank continual pre-training of the Taylor-pruned model (``loram align``,
  ``--align-steps`` steps of micro-batch 2 x 256 tokens), seconds per step (the stage's own
  ``align_seconds``, which also holds one validation pass before and after, over
  ``--align-steps`` steps);
* evaluation through lm-eval's ``HFLM``, as the evaluate stage runs it: generation
  (``generate_until``, greedy, KV cache, batch ``--batch``, up to ``--gen-tokens`` new tokens,
  no stop sequence) in generated tokens per second, and log-likelihood requests per second
  (``loglikelihood``, contexts of about 128 tokens, batch ``--batch``).

The last table divides every time by the model's parameters (seconds per 100M parameters;
per-token and per-request costs likewise), so it shows whether a cost grows in proportion to
the model or worse.

    python benchmarks/stage_cost.py --models tiny-llama,smollm2-135m --out reports/stage_cost.json
    python benchmarks/stage_cost.py --models qwen2.5-coder-0.5b --work /tmp/sc   # installs it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from offline_memory import run_measured  # noqa: E402  (a sibling script)

CRITERIA = ("random", "magnitude-stru", "taylor", "wanda", "sparsegpt", "magnitude")


def _loram(*args: str) -> list[str]:
    return [sys.executable, "-m", "loram.cli", *args]


def _params(path: Path, sections: dict) -> Path:
    path.write_text(json.dumps(sections), encoding="utf-8")
    return path


def _count_params(base: Path) -> int:
    from loram.shards import ShardReader

    r = ShardReader(base)
    total = 0
    for k in r.keys():
        n = 1
        for s in r.shape(k):
            n *= s
        total += n
    return total


def eval_child(model_dir: str, batch: int, gen_tokens: int, n_gen: int, n_ll: int) -> dict:
    """Generation tokens/s and log-likelihood requests/s through HFLM (run in a child)."""
    import torch
    from lm_eval.api.instance import Instance

    from loram.config import SourceParams
    from loram.data import load_rows
    from loram.evaluate.harness import _make_lm

    torch.manual_seed(0)
    lm = _make_lm(model_dir, None, batch, None, None)
    tok = lm.tokenizer
    rows = load_rows(SourceParams(kind="embedded", name="gsm8k", split="test"))
    texts = [r.get("prompt") or r.get("text") for r in rows]
    gen_args = {"until": [], "max_gen_toks": gen_tokens, "do_sample": False}
    gen = [
        Instance("generate_until", {}, (f"Question: {t}\nAnswer:", dict(gen_args)), i)
        for i, t in enumerate(texts[:n_gen])
    ]
    lm.generate_until(gen[:batch])  # warm-up: kernels, allocator
    t0 = time.perf_counter()
    outs = lm.generate_until(gen)
    gen_s = time.perf_counter() - t0
    new_tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
    ll = []
    for i, t in enumerate(texts[:n_ll]):
        ids = tok(t, add_special_tokens=False)["input_ids"][:140]
        ctx, cont = tok.decode(ids[:128]), tok.decode(ids[128:])
        ll.append(Instance("loglikelihood", {}, (ctx, cont or " yes"), i))
    lm.loglikelihood(ll[:batch])
    t0 = time.perf_counter()
    lm.loglikelihood(ll)
    ll_s = time.perf_counter() - t0
    return {
        "gen_seconds": round(gen_s, 2),
        "gen_new_tokens": new_tokens,
        "gen_tokens_per_second": round(new_tokens / gen_s, 2),
        "loglik_requests": len(ll),
        "loglik_seconds": round(ll_s, 2),
        "loglik_requests_per_second": round(len(ll) / ll_s, 2),
    }


def measure(model: str, work: Path, a, env: dict) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    row: dict = {"model": model}
    base = Path(model) if Path(model).is_dir() else work / "base"
    if not Path(model).is_dir():
        if not (base / "config.json").is_file():
            p = _params(work / "base.yaml", {"base": {"model": model, "dtype": a.dtype}})
            res = run_measured(
                _loram("base", "--params", str(p), "--out", str(base), "--metrics",
                       str(work / "base.json")), work / "base.log", env)  # fmt: skip
            if res["rc"]:
                raise SystemExit(f"{model}: base failed (see {res['log']})")
            row["base_seconds"] = res["seconds"]
    row["params"] = _count_params(base)
    print(f"{model}: {row['params']:,} parameters in {base}", flush=True)

    off = work / "offline.json"
    only = ",".join([f"prune:{c}" for c in CRITERIA] + ["recover", "merge"])
    res = run_measured(
        [sys.executable, str(HERE / "offline_memory.py"), "--base", str(base), "--work",
         str(work / "offline"), "--only", only, "--out", str(off)],
        work / "offline.log", env)  # fmt: skip
    if res["rc"]:
        raise SystemExit(f"{model}: offline stages failed (see {res['log']})")
    for r in json.loads(off.read_text())["rows"]:
        key = r["stage"] if r["stage"] != "prune" else f"prune_{r['variant']}"
        row[f"{key}_seconds"] = r["seconds"]
        row[f"{key}_peak_gb"] = round(r["peak_rss_bytes"] / 1e9, 3)

    steps = a.align_steps
    p = _params(work / "align.yaml", {"align": {
        "max_steps": steps, "micro_batch": 2, "seq_len": 256, "warmup_steps": 0,
        "save_every": steps, "max_val_blocks": 1, "optimizer": a.align_optimizer}})  # fmt: skip
    aligned = work / "aligned"
    res = run_measured(
        _loram("align", "--params", str(p), "--pruned", str(work / "offline" / "pruned-taylor"),
               "--data", str(work / "offline" / "data"), "--out", str(aligned),
               "--checkpoints", str(work / "align-ckpt"), "--metrics", str(work / "align.json"),
               "--plots", str(work / "align.csv")),
        work / "align.log", env)  # fmt: skip
    if res["rc"]:
        raise SystemExit(f"{model}: align failed (see {res['log']})")
    secs = json.loads((work / "align.json").read_text())["align_seconds"]
    row["align_seconds_per_step"] = round(secs / steps, 2)
    row["align_optimizer"] = a.align_optimizer
    row["align_peak_gb"] = round(res["peak_rss_bytes"] / 1e9, 3)

    out = work / "eval.json"
    res = run_measured(
        [sys.executable, os.path.abspath(__file__), "--eval-child", str(base), "--out", str(out),
         "--batch", str(a.batch), "--gen-tokens", str(a.gen_tokens), "--n-gen", str(a.n_gen),
         "--n-loglik", str(a.n_loglik)],
        work / "eval.log", env)  # fmt: skip
    if res["rc"]:
        raise SystemExit(f"{model}: evaluation failed (see {res['log']})")
    row.update(json.loads(out.read_text()))
    return row


STARTUP = "import torch, transformers, peft, loram.cli"
"""What every stage's fresh process pays before any work: timed once per run (``startup s``) and
subtracted from the whole-stage times in the per-parameter table."""


def startup_seconds(env: dict, work: Path) -> float:
    """Median wall time of three fresh processes that only import what a stage imports."""
    times = sorted(
        run_measured([sys.executable, "-c", STARTUP], work / "startup.log", env)["seconds"]
        for _ in range(3)
    )
    return times[1]


COLUMNS = (
    # (key, header, per-parameter kind: "time" = a whole stage's seconds (a fresh process: the
    # startup is subtracted in the per-parameter table), "step" = seconds inside a loop,
    # "rate" = per-second figure)
    ("base_seconds", "base s", "time"),
    ("prune_random_seconds", "rand s", "time"),
    ("prune_magnitude-stru_seconds", "mag-stru s", "time"),
    ("prune_taylor_seconds", "taylor s", "time"),
    ("prune_wanda_seconds", "wanda s", "time"),
    ("prune_sparsegpt_seconds", "sgpt s", "time"),
    ("prune_magnitude_seconds", "mag s", "time"),
    ("recover_seconds", "recover s", "time"),
    ("merge_seconds", "merge s", "time"),
    ("align_seconds_per_step", "align s/step", "step"),
    ("gen_tokens_per_second", "gen tok/s", "rate"),
    ("loglik_requests_per_second", "loglik req/s", "rate"),
)


def table(rows: list[dict], startup: float = 0.0) -> str:
    name_w = max(12, *(len(Path(r["model"]).name) for r in rows))
    head = f"{'model':<{name_w}} {'params':>13} " + " ".join(f"{h:>12}" for _, h, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(
            f"{r[k]:>12,.2f}" if isinstance(r.get(k), (int, float)) else f"{'-':>12}"
            for k, _, _ in COLUMNS
        )
        lines.append(f"{Path(r['model']).name:<{name_w}} {r['params']:>13,} {cells}")
    lines += ["", f"per 100M parameters (seconds x 1e8 / params, whole stages less the "
              f"{startup:.1f} s process startup; for rates: 1 / rate x 1e8 / params, i.e. "
              "seconds per token or request per 100M parameters)", head]  # fmt: skip
    for r in rows:
        scale = 1e8 / r["params"]
        cells = []
        for k, _, kind in COLUMNS:
            v = r.get(k)
            if not isinstance(v, (int, float)) or v == 0:
                cells.append(f"{'-':>12}")
                continue
            if kind == "time":
                v = max(v - startup, 0.0)
            cells.append(f"{(1 / v if kind == 'rate' else v) * scale:>12.4f}")
        lines.append(f"{Path(r['model']).name:<{name_w}} {r['params']:>13,} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from typing import get_args

    from loram.config import AlignParams, Optimizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny-llama,smollm2-135m")
    ap.add_argument("--dtype", default="float32", help="base.dtype for models converted here")
    ap.add_argument("--align-steps", type=int, default=4)
    ap.add_argument(
        "--align-optimizer",
        choices=get_args(Optimizer),
        default=AlignParams().optimizer,
        help="align.optimizer: AdamW's implementation for the full-rank alignment steps",
    )
    ap.add_argument("--batch", type=int, default=4, help="evaluation batch size (eval.batch_size)")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--n-gen", type=int, default=8, help="generation requests")
    ap.add_argument("--n-loglik", type=int, default=32, help="log-likelihood requests")
    ap.add_argument("--work", default=None, help="scratch dir, kept (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument(
        "--render", default=None, metavar="JSON", help="print the tables of an earlier --out"
    )
    ap.add_argument(
        "--startup",
        type=float,
        default=None,
        help="--render: the process startup to subtract, in seconds (default: the run's own)",
    )
    ap.add_argument("--eval-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text(encoding="utf-8"))
        if a.startup is not None:
            res["startup_seconds"] = a.startup
        elif "startup_seconds" not in res:
            with tempfile.TemporaryDirectory() as d:
                res["startup_seconds"] = startup_seconds(dict(os.environ), Path(d))
        print(table(res["rows"], res["startup_seconds"]))
        print(f"\n{res['date']}; {res['machine']}; process startup {res['startup_seconds']} s")
        return 0
    if a.eval_child:
        res = eval_child(a.eval_child, a.batch, a.gen_tokens, a.n_gen, a.n_loglik)
        Path(a.out).write_text(json.dumps(res), encoding="utf-8")
        return 0
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="loram-stage-cost-")
    root = Path(a.work or tmp.name)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    root.mkdir(parents=True, exist_ok=True)
    startup = startup_seconds(env, root)
    print(f"process startup (imports only): {startup} s", flush=True)
    rows = []
    for i, model in enumerate(m.strip() for m in a.models.split(",") if m.strip()):
        rows.append(measure(model, root / f"{i}-{Path(model).name}", a, env))
        print(table(rows, startup), flush=True)
    import platform

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\n{stamp}; {platform.machine()} {os.cpu_count()} cores; eval batch {a.batch}, "
          f"{a.gen_tokens} new tokens; align 2 x 256 tokens per step")  # fmt: skip
    if a.out:
        from loram.fsio import atomic_write_json

        atomic_write_json(a.out, {"date": stamp, "machine": f"{platform.machine()} "
                                  f"{os.cpu_count()} cores", "startup_seconds": startup,
                                  "rows": rows})  # fmt: skip
        print(f"wrote {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
