#!/usr/bin/env python
"""One training arm's peak memory, as ``benchmarks/train_cost.py`` measures it (peak RSS of this
process above its RSS just before the model is loaded, libraries imported first), for checking
``loram plan`` on settings the benchmark does not run (other micro-batches and sequence lengths).

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/plan_arm.py DIR lora 1 512 --steps 2
    python benchmarks/plan_arm.py PRUNED_DIR loram 2 512 --loss-chunk 256 >> results.log
    python benchmarks/plan_check.py --results results.log --config smollm2-135m

``DIR``: a model directory (``lora``) or a pruned artifact (``loram``, ``qloram``: NF4). The batch
is random token ids, every token labelled (what the planner assumes). Prints one ``RESULT {json}``
line. ``--loss-chunk`` / ``--grad-checkpointing`` need the training-cost options of
``loram.train`` (``prepare_lora_model``, ``loram.loss.batch_loss(..., chunk)``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("method", choices=("lora", "loram", "qloram"))
    ap.add_argument("micro_batch", type=int)
    ap.add_argument("seq_len", type=int)
    ap.add_argument("--loss-chunk", type=int, default=0)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv)

    import peft  # noqa: F401  (library code is not the arm's memory: imported before rss0)
    import torch
    import transformers  # noqa: F401

    from loram.config import TrainParams
    from loram.loss import batch_loss
    from loram.models import load_hf_model

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    import loram.train as train

    options = {"loss_chunk": a.loss_chunk, "grad_checkpointing": a.grad_checkpointing}
    if not hasattr(train, "prepare_lora_model") and (a.loss_chunk or a.grad_checkpointing):
        raise SystemExit("this checkout has no loss_chunk / grad_checkpointing training options")

    rss0 = _rss()
    if a.method == "lora":
        model = load_hf_model(a.model_dir)
    else:
        from loram.prune.artifact import load_pruned

        model, _ = load_pruned(a.model_dir)
    quantize = "nf4" if a.method == "qloram" else "none"
    if hasattr(train, "prepare_lora_model"):
        p = TrainParams(micro_batch=a.micro_batch, seq_len=a.seq_len, quantize=quantize, **options)
        pm = train.prepare_lora_model(model, p, "cpu")
    else:  # the same steps as loram.train.train_lora before the training-cost options
        from peft import get_peft_model

        from loram.quant import quantize_nf4

        p = TrainParams(micro_batch=a.micro_batch, seq_len=a.seq_len, quantize=quantize)
        dtype = next(x.dtype for x in model.parameters() if x.is_floating_point())
        if quantize == "nf4":
            model = quantize_nf4(model, compute_dtype=dtype)
        for prm in model.parameters():
            prm.requires_grad_(False)
        pm = get_peft_model(model, train.lora_config(p), autocast_adapter_dtype=True)
        with torch.no_grad():
            for prm in pm.parameters():
                if prm.requires_grad:
                    prm.data = prm.data.float()
    opt = torch.optim.AdamW([x for x in pm.parameters() if x.requires_grad], lr=1e-4)
    pm.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.micro_batch, a.seq_len), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for step in range(a.steps):
        torch.manual_seed(step)
        loss, n = (
            batch_loss(pm, batch, "cpu", a.loss_chunk)
            if a.loss_chunk
            else batch_loss(pm, batch, "cpu")
        )
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    dtype = next(x.dtype for x in model.parameters() if x.is_floating_point())
    result = {
        "src": a.model_dir,
        "method": a.method,
        "micro_batch": a.micro_batch,
        "seq_len": a.seq_len,
        "loss_chunk": a.loss_chunk,
        "grad_checkpointing": a.grad_checkpointing,
        "dropout_rng": getattr(p, "dropout_rng", "torch"),
        "steps": a.steps,
        "peak_mib": round(peak / 2**20, 1),
        "dtype": str(dtype),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
