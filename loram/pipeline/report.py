"""Stage ``report``: one table and plots over every arm (reports/results.md)."""

from __future__ import annotations

NAME = "report"
SECTIONS = ()
OPTIONS = {"metrics_dir": "metrics/arms", "loss_dir": "plots/loss", "out": "reports"}


def run(*, metrics_dir: str, loss_dir: str, out: str, params_file: str = "params.yaml") -> dict:
    from loram.report import default_meta, pipeline_arms, write_report

    meta = default_meta(metrics_dir, loss_dir, out, params_file)
    paths = write_report(metrics_dir, loss_dir, out, meta=meta, only=pipeline_arms(params_file))
    for key, path in paths.items():
        print(f"{key}: {path}")
    return {k: str(v) for k, v in paths.items()}
