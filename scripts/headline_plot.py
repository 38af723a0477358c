#!/usr/bin/env python
"""The headline figure (the paper's Figures 3-5 shape): quality against training memory.

Reads every ``metrics/arms/*.json`` of a run (``profiles/headline.yaml``) and plots, per arm, the
in-domain perplexity (left, lower is better) and HumanEval pass@1 with its standard error (right)
against the peak memory of that arm while it trains. Untuned models have no training memory: they are
drawn as horizontal reference lines. Prints the same numbers as a markdown table.

    python scripts/headline_plot.py                       # reports/headline.png + table on stdout
    python scripts/headline_plot.py --metrics DIR --out PNG
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_arms(metrics_dir: Path, params: Path | None = None) -> list[dict]:
    """The arm metrics of ``metrics_dir``; with ``params``, only the arms that params file runs
    (``loram.report.pipeline_arms``: a profile's run leaves the default run's committed
    metrics of other arms in place)."""
    from loram.report import pipeline_arms

    only = pipeline_arms(params) if params is not None else None
    arms = []
    for f in sorted(metrics_dir.glob("*.json")):
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SystemExit(f"{f} is not valid JSON: {exc}") from None
        if isinstance(rec, dict):
            rec.setdefault("arm", f.stem)
            if rec.get("skipped"):
                print(f"{rec['arm']}: not run ({rec['skipped']})")
            elif only is None or rec["arm"] in only:
                arms.append(rec)
    if not arms:
        raise SystemExit(f"no arm metrics in {metrics_dir} (run the pipeline first)")
    return arms


def point(arm: dict) -> dict:
    bench = arm.get("bench") if isinstance(arm.get("bench"), dict) else {}
    ppl = arm.get("ppl") if isinstance(arm.get("ppl"), dict) else {}
    return {
        "arm": arm["arm"],
        "description": arm.get("description", ""),
        # the training loop's peak where the run measured it (model resident, LoRA, optimizer,
        # activations), else the whole training stage's (load transient included)
        "memory_mib": arm.get("train_peak_rss_mib") or arm.get("peak_rss_mib"),
        "in_domain_ppl": ppl.get("in_domain"),
        "humaneval": bench.get("humaneval/pass@1"),
        "humaneval_stderr": bench.get("humaneval/pass@1_stderr"),
    }


PPL_SETS = ("in_domain", "ood_gsm8k", "general_text")


def table(arms: list[dict]) -> str:
    """One row per arm, every figure the headline asks for, each score with the error bar the
    pipeline's report gives it (``loram.report.format_with_error``)."""
    from loram.report import PPL_PREFIX, error_bar, format_value, format_with_error

    def cell(arm: dict, col: str, value) -> str:
        return format_with_error(col, value, error_bar(arm, col))

    lines = [
        "| arm | description | params held in training | peak memory while training (MiB) "
        "| peak memory of the training stage (MiB) | training time (s) | in-domain ppl | out-of-domain (GSM8K) ppl | general-text ppl "
        "| HumanEval pass@1 | CSR mean |",
        "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm in sorted(
        arms, key=lambda a: (point(a)["memory_mib"] is not None, point(a)["memory_mib"] or 0)
    ):
        ppl = arm.get("ppl") if isinstance(arm.get("ppl"), dict) else {}
        bench = arm.get("bench") if isinstance(arm.get("bench"), dict) else {}
        row = [
            arm["arm"],
            arm.get("description", ""),
            format_value("params_held", arm.get("params_held")),
            format_value("train_peak_rss_mib", arm.get("train_peak_rss_mib")),
            format_value("peak_rss_mib", arm.get("peak_rss_mib")),
            format_value("train_seconds", arm.get("train_seconds")),
            *(cell(arm, PPL_PREFIX + k, ppl.get(k)) for k in PPL_SETS),
            cell(arm, "humaneval/pass@1", bench.get("humaneval/pass@1")),
            cell(arm, "csr", bench.get("csr")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [
        ("in_domain_ppl", None, "in-domain perplexity (lower is better)"),
        ("humaneval", "humaneval_stderr", "HumanEval pass@1 (greedy)"),
    ]
    for ax, (key, err, label) in zip(axes, panels):
        for i, p in enumerate(points):
            y = p[key]
            if y is None:
                continue
            color = f"C{i % 10}"
            if p["memory_mib"] is None:  # untuned: a reference line
                ax.axhline(
                    y, color=color, linestyle="--", linewidth=1, label=f"{p['arm']} (untuned)"
                )
                continue
            yerr = p[err] if err and p[err] is not None else None
            ax.errorbar(
                p["memory_mib"] / 1024,
                y,
                yerr=yerr,
                fmt="o",
                color=color,
                capsize=3,
                label=p["arm"],
            )
            ax.annotate(
                p["arm"],
                (p["memory_mib"] / 1024, y),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        ax.set_xlabel("peak memory while training (GiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("Train small, infer large: quality against training memory")
    from loram.report import save_figure

    save_figure(fig, out)  # the report's figures' writer: atomic, 120 dpi, tight
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", default="metrics/arms")
    ap.add_argument("--out", default="reports/headline.png")
    ap.add_argument(
        "--params", default="params.yaml", help="report only this params file's arms ('' : all)"
    )
    a = ap.parse_args(argv)
    arms = load_arms(Path(a.metrics), Path(a.params) if a.params else None)
    plot([point(arm) for arm in arms], Path(a.out))
    print(table(arms))
    print(f"\nwrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
