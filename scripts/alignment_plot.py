#!/usr/bin/env python
"""When does alignment pay? The dose-response of ``profiles/alignment.yaml`` as a table and a plot.

For every arm of the run's ``params.yaml`` it reads the arm's base (``metrics/bases/BASE/align.json``:
alignment tokens, the pruned model's general-text perplexity before and after alignment) and the
merged model's perplexities (``metrics/arms/ARM.json``), then plots, against the alignment
tokens, the pruned model's general-text perplexity (left) and the merged model's in-domain
perplexity with its 95% bootstrap interval (right). Prints the table as markdown.

    python scripts/alignment_plot.py                     # reports/alignment.png + table on stdout
    python scripts/alignment_plot.py --params params.yaml --metrics metrics --out PNG
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def _read(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"{path} is missing (run the pipeline first: dvc repro)") from None
    except ValueError as exc:
        raise SystemExit(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(rec, dict):
        raise SystemExit(f"{path}: expected a JSON object")
    return rec


def doses(params_file: Path, metrics: Path, only: list[str] | None = None) -> list[dict]:
    """One row per arm of ``params_file`` (or of ``only``, a subset of them), sorted by the
    alignment tokens of its base."""
    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    arms = params.get("arms") or {}
    if not arms:
        raise SystemExit(f"{params_file} has no arms (apply the profile first)")
    if only:
        unknown = [a for a in only if a not in arms]
        if unknown:
            raise SystemExit(
                f"--arms: {', '.join(unknown)} not among the arms of {params_file} "
                f"({', '.join(arms)})"
            )
        arms = {a: arms[a] for a in only}
    rows = []
    for name, spec in arms.items():
        base = (spec or {}).get("base", "stru")
        align = _read(metrics / "bases" / base / "align.json")
        arm = _read(metrics / "arms" / f"{name}.json")
        ppl = arm.get("ppl") or {}
        ci = (arm.get("ppl_ci95") or {}).get("in_domain") or {}
        enabled = bool(align.get("enabled", True))
        rows.append(
            {
                "arm": name,
                "base": base,
                "tokens": int(align.get("tokens", 0)) if enabled else 0,
                "pruned_general_before": align.get("val_ppl_before"),
                "pruned_general_after": align.get("val_ppl_after") if enabled else None,
                "align_seconds": align.get("align_seconds") if enabled else 0.0,
                "merged_in_domain": ppl.get("in_domain"),
                "merged_in_domain_ci95": (ci.get("low"), ci.get("high")),
                "merged_ood": ppl.get("ood_gsm8k"),
                "merged_general": ppl.get("general_text"),
            }
        )
    return sorted(rows, key=lambda r: r["tokens"])


def table(rows: list[dict]) -> str:
    def f(v, fmt=".2f"):
        return "–" if v is None else format(v, fmt)

    lines = [
        "| arm | base | alignment tokens | alignment time (s) | pruned model, general-text ppl "
        "| merged, in-domain ppl [95% CI] | merged, out-of-domain (GSM8K) ppl "
        "| merged, general-text ppl |",
        "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        pruned = f(r["pruned_general_after"]) if r["tokens"] else f(r["pruned_general_before"])
        lo, hi = r["merged_in_domain_ci95"]
        ci = "" if lo is None else f" [{lo:.2f}–{hi:.2f}]"
        lines.append(
            f"| {r['arm']} | {r['base']} | {r['tokens']:,} | {f(r['align_seconds'], '.0f')} | "
            f"{pruned} | {f(r['merged_in_domain'], '.4f')}{ci} | {f(r['merged_ood'], '.4f')} | "
            f"{f(r['merged_general'], '.3f')} |"
        )
    return "\n".join(lines)


def references(metrics: Path) -> dict[str, float]:
    """In-domain perplexity of the run's untuned original and of LoRA on the full model, if run."""
    out = {}
    for name in ("original", "lora_full"):
        f = metrics / "arms" / f"{name}.json"
        if f.is_file():
            v = (_read(f).get("ppl") or {}).get("in_domain")
            if v is not None:
                out[name] = float(v)
    return out


def plot(rows: list[dict], refs: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["tokens"] for r in rows]
    pruned = [
        r["pruned_general_after"] if r["tokens"] else r["pruned_general_before"] for r in rows
    ]
    merged = [r["merged_in_domain"] for r in rows]
    lo = [m - (r["merged_in_domain_ci95"][0] or m) for m, r in zip(merged, rows)]
    hi = [(r["merged_in_domain_ci95"][1] or m) - m for m, r in zip(merged, rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(x, pruned, "o-")
    axes[0].set_ylabel("pruned model: general-text perplexity")
    axes[1].errorbar(x, merged, yerr=[lo, hi], fmt="o-", capsize=3)
    axes[1].set_ylabel("merged model: in-domain perplexity (95% CI)")
    for i, (name, v) in enumerate(refs.items()):
        axes[1].axhline(v, color=f"C{i + 1}", linestyle="--", linewidth=1, label=f"{name}: {v:.4f}")
    if refs:
        axes[1].legend(fontsize=7)
    for ax, ys in zip(axes, (pruned, merged)):
        ax.set_xscale("symlog", linthresh=10_000)
        ax.set_xlabel("alignment tokens")
        ax.grid(alpha=0.3)
        for xi, yi, r in zip(x, ys, rows):
            if yi is not None:
                ax.annotate(
                    r["arm"], (xi, yi), fontsize=7, textcoords="offset points", xytext=(4, 4)
                )
    fig.suptitle("When does alignment pay? (structured pruning, dose-response)")
    from loram.report import save_figure

    save_figure(fig, out)  # the report's figures' writer: atomic, 120 dpi, tight
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics")
    ap.add_argument("--out", default="reports/alignment.png")
    ap.add_argument(
        "--arms", default="", help="comma-separated arms to keep (default: every arm of --params)"
    )
    a = ap.parse_args(argv)
    only = [x.strip() for x in a.arms.split(",") if x.strip()]
    rows = doses(Path(a.params), Path(a.metrics), only or None)
    refs = references(Path(a.metrics))
    plot(rows, refs, Path(a.out))
    print(table(rows))
    for name, v in refs.items():
        print(f"\n{name}: in-domain perplexity {v:.4f}")
    print(f"\nwrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
