#!/usr/bin/env python
"""Does LoRAM transfer on this data? A quick in-process check, no DVC.

Prunes the model (structured or random), trains LoRA on the pruned model, recovers the adapter
and merges it into the original, then prints the held-out response perplexity of the original,
of the pruned model with its unrecovered adapter, of the LoRAM merged model and (``--full``) of
LoRA trained on the full model with the same settings. One JSON line per run goes to stdout and,
with ``--log``, is appended to a file. No alignment: this measures how well training on the
pruned model carries over, which the pipeline's alignment stage then improves.

Examples (SmolLM2-135M, 2 CPU cores, about 8 minutes each with ``--eval-rows 60``)::

    python scripts/transfer_check.py --train mbpp --lr 3e-4
    python scripts/transfer_check.py --train math --lr 1e-3
    python scripts/transfer_check.py --train path/to/gsm8k_train.jsonl --full

``--train`` is an embedded source name (``loram.data.EMBEDDED``) or a local data file;
``--eval`` (optional) a separate file to score instead of the held-out split.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _source(name: str):
    from loram.config import SourceParams
    from loram.data import EMBEDDED

    if name in EMBEDDED:
        return SourceParams(kind="embedded", name=name)
    if Path(name).exists():
        return SourceParams(kind="file", name=name)
    raise SystemExit(
        f"--train/--eval {name!r} is neither an embedded source ({', '.join(EMBEDDED)}) "
        "nor an existing file"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", default="mbpp")
    ap.add_argument("--eval", default=None)
    ap.add_argument("--eval-rows", type=int, default=60)
    ap.add_argument("--method", choices=["structured", "random"], default="structured")
    ap.add_argument("--criterion", choices=["taylor", "magnitude"], default="taylor")
    ap.add_argument("--ratio", type=float, default=0.65)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--full", action="store_true", help="also train LoRA on the full model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="append the JSON result to this file")
    a = ap.parse_args(argv)

    import torch

    from loram.config import TrainParams
    from loram.data import load_rows, split_rows
    from loram.evaluate.perplexity import perplexity
    from loram.merge import merge_adapter
    from loram.models import load_model
    from loram.pipeline.prune import calibration_batches
    from loram.prune.common import pruned_layers
    from loram.prune.structured import prune_structured
    from loram.recover import recover_adapter
    from loram.train import train_lora

    rows = load_rows(_source(a.train))
    train_rows, held = split_rows(rows, 0.1, max(a.eval_rows, 1), a.seed)
    eval_rows = load_rows(_source(a.eval))[: a.eval_rows] if a.eval else held[: a.eval_rows]
    tp = TrainParams(
        lr=a.lr,
        max_steps=a.steps,
        micro_batch=a.micro_batch,
        r=a.r,
        alpha=2.0 * a.r,
        seq_len=a.seq_len,
        eval_every=10**6,
        save_every=10**6,
        seed=a.seed,
    )

    def load():
        return load_model(a.model)

    model, tok = load()

    def ppl(m) -> float:
        m.eval()
        with torch.no_grad():
            return perplexity(m, tok, eval_rows, seq_len=384, batch_size=4)["ppl"]

    res: dict = {"args": vars(a), "eval_rows": len(eval_rows)}
    t0 = time.time()
    res["original"] = ppl(model)
    print(f"original {res['original']}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        if a.full:
            train_lora(model, tok, train_rows, held[:8], tp, td / "full", td / "ck_full")
            res["lora_full"] = ppl(model)
            print(f"lora_full {res['lora_full']}", file=sys.stderr, flush=True)
            model, tok = load()
        layers = pruned_layers(model.config.num_hidden_layers, None, None)
        calib = None
        if a.method == "structured" and a.criterion == "taylor":
            calib = calibration_batches(tok, train_rows, a.calib_samples, a.seq_len, a.seed)
        criterion = "random" if a.method == "random" else a.criterion
        manifest = prune_structured(
            model, a.ratio, layers, criterion=criterion, calib_batches=calib, seed=a.seed
        )
        train_lora(model, tok, train_rows, held[:8], tp, td / "pruned", td / "ck")
        res["no_recovery"] = ppl(model)
        print(f"no_recovery {res['no_recovery']}", file=sys.stderr, flush=True)
        recover_adapter(td / "pruned", manifest, td / "recovered")
        original, _ = load()
        res["loram"] = ppl(merge_adapter(original, td / "recovered"))
    res["gap_closed"] = (
        round((res["original"] - res["loram"]) / (res["original"] - res["lora_full"]), 3)
        if "lora_full" in res and res["original"] != res["lora_full"]
        else None
    )
    res["seconds"] = round(time.time() - t0, 1)
    line = json.dumps(res)
    print(line, flush=True)
    if a.log:
        with open(a.log, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return res


if __name__ == "__main__":
    main()
