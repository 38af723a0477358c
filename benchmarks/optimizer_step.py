"""How long one AdamW step takes with each of torch's implementations (``train.optimizer`` /
``align.optimizer``: fused, foreach, for_loop), over the parameters that a training stage updates.

Alignment trains every parameter of the pruned model (full rank); LoRA training only the adapters.
The tensors have the shapes of the model (``--model`` as ``loram plan --model``), pruned at
``--ratio`` as structured pruning keeps them (``--ratio 0``: the original model), with
``--lora-r R`` the LoRA adapters of rank R on every projection instead. Every implementation steps
the same tensors (interleaved, ``--repeat`` times after one warm-up step each) and the median is
printed, with GB/s of optimizer state moved (parameter, gradient and two moments read, three
written: 28 bytes per fp32 parameter)::

    python benchmarks/optimizer_step.py                       # SmolLM2-135M pruned at 0.65: align
    python benchmarks/optimizer_step.py --lora-r 8            # its LoRA adapters
    python benchmarks/optimizer_step.py --model qwen2.5-coder-0.5b --ratio 0.85
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def shapes(config, ratio: float, lora_r: int, round_to: int) -> list[tuple[int, ...]]:
    """The shapes of the tensors a step updates: the (pruned) model's parameters, or its LoRA
    adapters' A (r x in) and B (out x r) on every linear projection of the decoder."""
    from loram.memory import meta_model, pruned_meta_model

    if ratio > 0:
        model, _ = pruned_meta_model(config, "structured", ratio, round_to=round_to)
    else:
        model = meta_model(config)
    if not lora_r:
        return [tuple(p.shape) for p in model.parameters()]
    import torch

    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            out += [(lora_r, m.in_features), (m.out_features, lora_r)]
    return out


def main(argv: list[str] | None = None) -> int:
    from typing import get_args

    from loram.config import Optimizer, PruneParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="as loram plan --model")
    ap.add_argument("--ratio", type=float, default=0.65, help="structured pruning ratio (0: none)")
    ap.add_argument("--lora-r", type=int, default=0, help="time LoRA adapters of this rank")
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    a = ap.parse_args(argv)
    if not 0 <= a.ratio < 1:
        ap.error(f"--ratio must be in [0, 1), got {a.ratio}")
    if a.repeat < 1 or a.lora_r < 0:
        ap.error("--repeat must be >= 1 and --lora-r >= 0")
    import torch

    from loram.plan import resolve_model
    from loram.trainloop import adamw_impl

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    shp = shapes(resolve_model(a.model), a.ratio, a.lora_r, PruneParams().round_to)
    g = torch.Generator().manual_seed(0)
    params = []
    for s in shp:
        p = torch.nn.Parameter(torch.randn(*s, generator=g).to(device))
        p.grad = torch.randn(*s, generator=g).to(device) * 1e-3
        params.append(p)
    n = sum(p.numel() for p in params)
    # every explicit choice of train.optimizer, with the keyword arguments training passes
    impls = [c for c in get_args(Optimizer) if c != "auto"]
    opts = {c: torch.optim.AdamW(params, lr=1e-5, **adamw_impl(c, device, False)) for c in impls}
    for o in opts.values():  # allocates the moments
        o.step()
    sync()
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(a.repeat):  # interleaved: the machine's drift falls on every implementation
        for k, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            sync()
            times[k].append(time.perf_counter() - t0)
    what = f"LoRA r {a.lora_r} adapters" if a.lora_r else "every parameter"
    pruned = f"pruned at {a.ratio}" if a.ratio else "unpruned"
    print(f"{a.model} {pruned}, {what}: {n:,} parameters in {len(params)} tensors, fp32 on "
          f"{device}; median of {a.repeat} interleaved steps")  # fmt: skip
    print(f"{'optimizer':<10}{'ms/step':>10}{'GB/s':>8}{'x fused':>9}")
    fused = statistics.median(times["fused"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:<10}{med * 1e3:>10.1f}{28 * n / med / 1e9:>8.1f}{med / fused:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
