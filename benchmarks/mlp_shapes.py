"""How fast the pruned MLP's matrix products run at the ratio's exact channel count and at the
count ``prune.round_to`` keeps (CPU or GPU), per FLOP.

For a model's config and a pruning ratio, the MLP of a pruned layer keeps ``k`` of ``d``
intermediate channels. One LoRA training step multiplies by its three frozen projections six
times: gate and up forward (``tokens x hidden @ hidden x k``), down forward (``tokens x k @ k x
hidden``) and the three input gradients. This times those six products for the unpruned ``d``,
the exact ``k`` and the rounded ``k`` (interleaved, each the median of ``--repeat`` runs) and
prints milliseconds, GFLOP/s and the time per kept channel::

    python benchmarks/mlp_shapes.py                               # SmolLM2-135M, 0.65, round_to 8
    python benchmarks/mlp_shapes.py --model qwen2.5-coder-0.5b --ratio 0.65 --round-to 8 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _products(tokens: int, hidden: int, k: int, device: str, dtype):
    """The six products of one MLP's frozen projections in a LoRA step, as closures."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, gate, down = rand(tokens, hidden), rand(k, hidden), rand(hidden, k)
    act, grad_out, grad_act = rand(tokens, k), rand(tokens, hidden), rand(tokens, k)
    return {
        "gate/up fwd": (2, lambda: x @ gate.t()),
        "down fwd": (1, lambda: act @ down.t()),
        "gate/up grad": (2, lambda: grad_act @ gate),
        "down grad": (1, lambda: grad_out @ down),
    }


def main(argv: list[str] | None = None) -> int:
    from loram.config import PruneParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="as loram plan --model: a shipped config, config.json, model dir, tiny / embedded name",
    )
    ap.add_argument("--ratio", type=float, default=0.65)
    ap.add_argument(
        "--round-to",
        type=int,
        nargs="+",
        default=[PruneParams().round_to],
        help="one or more multiples (default: prune.round_to's default)",
    )
    ap.add_argument("--tokens", type=int, default=2048, help="micro-batch x sequence (4 x 512)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    a = ap.parse_args(argv)
    import torch

    from loram.plan import resolve_model
    from loram.prune.common import kept_mlp_channels

    if a.repeat < 3:
        ap.error(f"--repeat must be >= 3, got {a.repeat}")
    cfg = resolve_model(a.model)
    d, hidden = cfg.intermediate_size, cfg.hidden_size
    sizes = {"unpruned": d, "exact": kept_mlp_channels(d, a.ratio)}
    for m in a.round_to:
        try:
            sizes[f"round_to {m}"] = kept_mlp_channels(d, a.ratio, m)
        except ValueError as exc:
            ap.error(str(exc))
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    prods = {name: _products(a.tokens, hidden, k, device, dtype) for name, k in sizes.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for name in prods:  # warm-up
        for _, f in prods[name].values():
            f()
    sync()
    for _ in range(a.repeat):  # interleaved: the machine's drift hits every size alike
        for name, ps in prods.items():
            for op, (_, f) in ps.items():
                t0 = time.perf_counter()
                f()
                sync()
                times.setdefault((name, op), []).append(time.perf_counter() - t0)
    print(f"{a.model}: hidden {hidden}, {d} MLP channels, ratio {a.ratio}, {a.tokens} tokens, "
          f"{a.dtype} on {device}; median of {a.repeat} interleaved runs")  # fmt: skip
    ops = list(next(iter(prods.values())))
    head = f"{'channels':<22}" + "".join(f"{op:>16}" for op in ops)
    print(head + f"{'step ms':>10}{'GFLOP/s':>9}{'us/channel':>11}")
    print("-" * (len(head) + 30))
    base = None
    for name, k in sizes.items():
        med = {op: statistics.median(times[(name, op)]) for op in ops}
        step = sum(prods[name][op][0] * med[op] for op in ops)
        gflops = 6 * 2 * a.tokens * hidden * k / step / 1e9
        per = step / k * 1e6
        base = base or per
        cells = "".join(f"{med[op] * 1e3:>9.2f} ms {2 * a.tokens * hidden * k / med[op] / 1e9:>3.0f}"
                        for op in ops)  # fmt: skip
        print(f"{name + f' ({k})':<22}{cells}{step * 1e3:>10.2f}{gflops:>9.1f}{per:>11.2f}")
    print("cells: milliseconds and GFLOP/s of one product; step: the six products of one "
          "layer's MLP in a LoRA step")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
