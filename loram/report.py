"""Results report: one comparison table, a verdict paragraph and plots built from the arm metrics.

Inputs (every field optional unless stated):

* ``metrics/arms/<arm>.json``: ``arm`` (else the file stem), ``kind`` (original | lora_full |
  lora_small | loram | variant | no_recovery | ...), ``description``, ``method``, ``ratio``,
  ``aligned``, ``quantize``, ``params_original``, ``params_held``, ``reduction``,
  ``peak_rss_mib``, ``train_seconds``, ``ppl`` (set -> perplexity), ``ppl_ci95`` (set ->
  ``{low, high}`` bootstrap interval) and ``bench`` (metric -> score in [0, 1], with
  ``<metric>_stderr`` / ``_ci95_low`` / ``_ci95_high`` error bars).
* ``metrics/details/<arm>/samples.jsonl`` (per-document scores and perplexity losses) and
  ``provenance.json`` (splits, seeds, sandbox mode): the paired tests behind the verdicts
  (``loram.evaluate.stats``: McNemar for 0/1 scores, else a paired bootstrap; "better" /
  "worse" only when significant at 95%) and the footnotes.
* ``plots/loss/<arm>.csv``: ``arm,step,loss,val_loss,lr`` (``val_loss`` may be empty).
* Sweep rows: ``{"ratio", "method", "arm", "ppl", "bench", ...}``, e.g. from
  :func:`sweep_rows_from_dvc_exp_json`.

Nothing in the report is hard-coded: every number, column and sentence derives from the inputs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from loram.benchmarks import CSR_TASKS as CSR_TASK_NAMES
from loram.fsio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

MISSING = "–"
TABLE_START = "<!-- results-table:start -->"
TABLE_END = "<!-- results-table:end -->"

# Fixed arm order: baselines first, then LoRAM, its variants, ablations; the rest alphabetical.
KIND_RANK: dict[str, int] = {
    "original": 0,
    "lora_full": 1,
    "lora_small": 2,
    "loram": 3,
    "variant": 4,
    "no_recovery": 5,
    "ablation": 5,
    "noalign": 5,
    "pruned": 5,
}
UNKNOWN_RANK = 9
BASELINE_KINDS = ("original", "lora_full", "lora_small", "no_recovery")

COST_COLUMNS: list[tuple[str, str]] = [
    ("params_held", "params held in training"),
    ("reduction", "reduction ×"),
    ("base_weight_mib", "base weights held in training (MiB)"),
    ("peak_rss_mib", "peak memory of the training stage (MiB)"),
    ("train_peak_rss_mib", "peak memory while training (MiB)"),
    ("train_seconds", "training time (s)"),
    ("sparsity", "sparsity of the pruned layers in training"),
    ("sparsity_merged", "sparsity of those layers after merge"),
]
OPTIONAL_COST_COLUMNS = ("base_weight_mib", "train_peak_rss_mib", "sparsity", "sparsity_merged")
BENCH_LABELS: dict[str, str] = {
    "gsm8k/exact_match_strict": "GSM8K strict",
    "gsm8k/exact_match_flexible": "GSM8K flex",
    "csr": "CSR mean",
    "arc_easy/acc": "ARC-e",
    "arc_challenge/acc": "ARC-c",
    "hellaswag/acc": "HellaSwag",
    "openbookqa/acc": "OBQA",
    "piqa/acc": "PIQA",
    "winogrande/acc": "WinoGrande",
    "humaneval/pass@1": "HumanEval pass@1",
    "humaneval/pass@10": "HumanEval pass@10",
    "mathqa/acc": "MathQA",
}
PPL_PREFIX = "ppl/"


# ---------------------------------------------------------------------------------------------
# small helpers


def _num(value: Any) -> float | None:
    """A finite-or-infinite float, or None for missing / NaN / non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            return None
    else:
        return None
    return None if math.isnan(v) else v


def save_figure(fig: Any, out_png: Path | str) -> Path:
    """Save a matplotlib Figure as PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(Path(out_png), buf.getvalue())


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    """A pyplot-free Agg figure with ``ncols`` axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _arm_name(arm: Mapping[str, Any]) -> str:
    return str(arm.get("arm", "?"))


def _arm_kind(arm: Mapping[str, Any]) -> str:
    kind = arm.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    name = _arm_name(arm)
    return name if name in KIND_RANK else "unknown"


def _arm_rank(arm: Mapping[str, Any]) -> tuple[int, str]:
    name = _arm_name(arm)
    low = name.lower()
    if "noalign" in low or "no_align" in low:
        rank = KIND_RANK["ablation"]
    else:
        rank = KIND_RANK.get(_arm_kind(arm), UNKNOWN_RANK)
    return rank, name


def _is_trained(arm: Mapping[str, Any]) -> bool:
    return _arm_kind(arm) != "original"


def _bench_values(arm: Mapping[str, Any]) -> dict[str, float]:
    bench = arm.get("bench")
    if not isinstance(bench, Mapping):
        return {}
    out = {}
    for key, value in bench.items():
        # acc_norm is kept in the arm metrics but left out of the table (the paper reports acc).
        if (
            key == "metadata"
            or "stderr" in str(key)
            or "_ci95_" in str(key)
            or str(key).endswith("/acc_norm")
        ):
            continue
        v = _num(value)
        if v is not None:
            out[str(key)] = v
    return out


def _ppl_values(arm: Mapping[str, Any]) -> dict[str, float]:
    ppl = arm.get("ppl")
    if not isinstance(ppl, Mapping):
        return {}
    out = {}
    for key, value in ppl.items():
        v = _num(value)
        if v is not None:
            out[str(key)] = v
    return out


def _bench_order(keys: Iterable[str]) -> list[str]:
    keys = set(keys)
    known = [k for k in BENCH_LABELS if k in keys]
    return known + sorted(keys - set(known))


def _ppl_order(keys: Iterable[str]) -> list[str]:
    keys = set(keys)

    def rank(k: str) -> tuple[int, str]:
        if k == "in_domain":
            return 0, k
        if k.startswith("ood"):
            return 1, k
        if k == "general_text":
            return 2, k
        return 3, k

    return sorted(keys, key=rank)


def column_label(key: str) -> str:
    """Human header for a :func:`results_table` column key."""
    if key.startswith(PPL_PREFIX):
        return f"{key[len(PPL_PREFIX) :]} ppl"
    for k, label in COST_COLUMNS:
        if k == key:
            return label
    return BENCH_LABELS.get(key, key)


def _lower_is_better(key: str) -> bool:
    return key.startswith(PPL_PREFIX)


def _mib(value: Any) -> float | None:
    v = _num(value)
    return None if v is None else v / 2**20


def format_value(key: str, value: Any) -> str:
    """Format one cell: params with separators, accuracies as %, perplexity with 2 decimals."""
    if key in ("arm", "description"):
        return MISSING if value is None or value == "" else str(value)
    v = _num(value)
    if v is None:
        return MISSING
    if math.isinf(v):
        return "inf"
    if key == "params_held":
        return f"{round(v):,}"
    if key == "reduction":
        return f"{v:.2f}×"
    if key in ("peak_rss_mib", "train_peak_rss_mib", "train_seconds", "base_weight_mib"):
        return f"{v:,.1f}"
    if key.startswith(PPL_PREFIX):
        return f"{v:,.2f}"
    return f"{100.0 * v:.1f}%"


def _describe(arm: Mapping[str, Any]) -> str | None:
    """The arm's description, else one built from method / ratio / aligned / quantize."""
    desc = arm.get("description")
    if isinstance(desc, str) and desc.strip():
        return desc.strip()
    parts = []
    if arm.get("method"):
        ratio = _num(arm.get("ratio"))
        parts.append(f"{arm['method']} {ratio:g}" if ratio is not None else str(arm["method"]))
    if isinstance(arm.get("aligned"), bool):
        parts.append("aligned" if arm["aligned"] else "not aligned")
    q = arm.get("quantize")
    if isinstance(q, str) and q and q != "none":
        parts.append(q)
    return ", ".join(parts) or None


# ---------------------------------------------------------------------------------------------
# inputs


def pipeline_arms(params_file: str | Path = "params.yaml") -> set[str] | None:
    """The arms the pipeline of ``params_file`` evaluates: ``original``, ``lora_full``, every
    entry of ``arms`` and ``variants`` and of ``ablations.noalign`` / ``no_recovery``. None
    when there is no such file (then every metrics file counts)."""
    from loram.config import load_params

    if not Path(params_file).is_file():
        return None
    p = load_params(params_file)
    return {
        "original",
        "lora_full",
        *p["arms"],
        *p["variants"],
        *p["ablations"].noalign,
        *p["ablations"].no_recovery,
    }


def collect_arms(
    metrics_dir: str | Path = "metrics/arms", only: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """Read every ``<arm>.json`` in ``metrics_dir``, in the fixed arm order.

    ``only``: the arm names to keep (:func:`pipeline_arms`); files of other arms (left by an
    earlier run with other params, e.g. the default run's committed metrics under a profile)
    are skipped with a log line.

    Raises FileNotFoundError when the folder is missing or has no ``*.json``, ValueError (naming
    the file) for corrupt JSON, a non-object document or a duplicated arm name.
    """
    d = Path(metrics_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"arm metrics folder {d} does not exist")
    files = sorted(p for p in d.glob("*.json") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no arm metrics (*.json) in {d}")
    arms: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for path in files:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"corrupt arm metrics file {path}: {exc}") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"arm metrics file {path} is not a JSON object")
        name = obj.get("arm") or path.stem
        obj["arm"] = str(name)
        if only is not None and obj["arm"] not in only:
            log.info("report: %s is not an arm of this run's params; left out", path)
            continue
        if obj["arm"] in seen:
            raise ValueError(f"arm {obj['arm']!r} appears in both {seen[obj['arm']]} and {path}")
        seen[obj["arm"]] = path
        if obj.get("skipped"):
            log.info("report: %s was not run (%s); left out", obj["arm"], obj["skipped"])
            continue
        _attach_details(obj, d.parent / "details" / obj["arm"])
        arms.append(obj)
    if not arms:
        raise FileNotFoundError(f"no metrics in {d} of the arms {sorted(only or [])}")
    return sorted(arms, key=_arm_rank)


def skipped_arms(
    metrics_dir: str | Path = "metrics/arms", only: Collection[str] | None = None
) -> dict[str, str]:
    """Arm name -> why it was not run, for the metrics files that record a switched-off arm
    (``baselines.lora_full``); :func:`collect_arms` leaves them out."""
    out: dict[str, str] = {}
    for path in sorted(Path(metrics_dir).glob("*.json")):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # collect_arms names the corrupt file
        if isinstance(obj, dict) and obj.get("skipped"):
            name = str(obj.get("arm") or path.stem)
            if only is None or name in only:
                out[name] = str(obj["skipped"])
    return out


def _attach_details(arm: dict[str, Any], folder: Path) -> None:
    """Per-document scores (``_per_doc``: key -> {doc_id: value}, perplexity rows
    ``[nll, tokens]``) and ``_provenance`` from an arm's details folder, when present."""
    per_doc: dict[str, dict[int, Any]] = {}
    samples = folder / "samples.jsonl"
    if samples.is_file():
        for i, line in enumerate(samples.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"corrupt per-document results {samples} line {i}: {exc}") from exc
            task, doc = str(rec.get("task")), int(rec.get("doc_id", -1))
            if task.startswith("ppl/"):
                per_doc.setdefault(task, {})[doc] = [float(rec["nll"]), float(rec["tokens"])]
                continue
            for key, v in (rec.get("scores") or {}).items():
                per_doc.setdefault(f"{task}/{key}", {})[doc] = float(v)
    arm["_per_doc"] = per_doc
    prov = folder / "provenance.json"
    arm["_provenance"] = json.loads(prov.read_text(encoding="utf-8")) if prov.is_file() else {}


def read_losses(loss_dir: str | Path) -> pd.DataFrame:
    """All ``<arm>.csv`` loss curves in ``loss_dir`` as one frame (arm, step, loss, val_loss)."""
    frames = []
    d = Path(loss_dir)
    for path in sorted(d.glob("*.csv")) if d.is_dir() else []:
        try:
            df = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            continue
        if "step" not in df.columns:
            continue
        if "arm" not in df.columns:
            df["arm"] = path.stem
        df["arm"] = df["arm"].fillna(path.stem).astype(str)
        for col in ("loss", "val_loss"):
            df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else float("nan")
        df["step"] = pd.to_numeric(df["step"], errors="coerce")
        frames.append(df[["arm", "step", "loss", "val_loss"]].dropna(subset=["step"]))
    if not frames:
        return pd.DataFrame(columns=["arm", "step", "loss", "val_loss"])
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# table and text


def results_table(arms: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per arm with raw values (NaN when missing).

    Columns: ``arm``, ``description``, ``params_held``, ``reduction``, ``peak_rss_mib``,
    ``train_seconds``, every benchmark key present in any arm (e.g. ``csr``,
    ``gsm8k/exact_match_strict``), then ``ppl/<set>`` for every perplexity set present.
    ``reduction`` falls back to ``params_original / params_held``.
    """
    bench_keys = _bench_order(k for a in arms for k in _bench_values(a))
    ppl_keys = _ppl_order(k for a in arms for k in _ppl_values(a))
    rows = []
    for arm in arms:
        held = _num(arm.get("params_held"))
        orig = _num(arm.get("params_original"))
        reduction = _num(arm.get("reduction"))
        if reduction is None and held and orig is not None:
            reduction = orig / held
        row: dict[str, Any] = {
            "arm": _arm_name(arm),
            "description": _describe(arm),
            "params_held": held,
            "reduction": reduction,
            "base_weight_mib": _mib(arm.get("base_param_bytes")),
            "peak_rss_mib": _num(arm.get("peak_rss_mib")),
            "train_peak_rss_mib": _num(arm.get("train_peak_rss_mib")),
            "train_seconds": _num(arm.get("train_seconds")),
            "sparsity": _num(arm.get("sparsity")),
            "sparsity_merged": _num(arm.get("sparsity_merged")),
        }
        bench = _bench_values(arm)
        row.update({k: bench.get(k) for k in bench_keys})
        ppl = _ppl_values(arm)
        row.update({PPL_PREFIX + k: ppl.get(k) for k in ppl_keys})
        rows.append(row)
    cols = ["arm", "description"] + [k for k, _ in COST_COLUMNS] + bench_keys
    cols += [PPL_PREFIX + k for k in ppl_keys]
    df = pd.DataFrame(rows, columns=cols)
    num_cols = cols[2:]
    df[num_cols] = df[num_cols].apply(pd.to_numeric, errors="coerce").astype(float)
    # Optional cost columns that no arm reports (e.g. sparsity without sparse arms) are dropped.
    empty = [k for k in OPTIONAL_COST_COLUMNS if df[k].isna().all()]
    return df.drop(columns=empty)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The benchmark and perplexity columns of a :func:`results_table` frame."""
    fixed = {"arm", "description"} | {k for k, _ in COST_COLUMNS}
    return [c for c in df.columns if c not in fixed]


def best_arms(arms: Sequence[Mapping[str, Any]], df: pd.DataFrame | None = None) -> dict[str, set]:
    """Per metric column, the arm names holding the best value among the trained arms (ties all)."""
    df = results_table(arms) if df is None else df
    trained = {_arm_name(a) for a in arms if _is_trained(a)}
    out: dict[str, set] = {}
    for col in metric_columns(df):
        sub = df[df["arm"].isin(trained)][["arm", col]].dropna()
        if sub.empty:
            out[col] = set()
            continue
        best = sub[col].min() if _lower_is_better(col) else sub[col].max()
        fmt_best = format_value(col, best)
        out[col] = {a for a, v in zip(sub["arm"], sub[col]) if format_value(col, v) == fmt_best}
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def error_bar(arm: Mapping[str, Any], col: str) -> dict[str, float] | None:
    """``{stderr?, low, high}`` of a metric column of one arm, if its metrics carry one."""
    if col.startswith(PPL_PREFIX):
        ci = (arm.get("ppl_ci95") or {}).get(col[len(PPL_PREFIX) :])
        if isinstance(ci, Mapping) and _num(ci.get("low")) is not None:
            return {"low": float(ci["low"]), "high": float(ci["high"])}
        return None
    bench = arm.get("bench") if isinstance(arm.get("bench"), Mapping) else {}
    se = _num(bench.get(f"{col}_stderr"))
    lo, hi = _num(bench.get(f"{col}_ci95_low")), _num(bench.get(f"{col}_ci95_high"))
    if se is None:
        return None
    out = {"stderr": se}
    if lo is not None and hi is not None:
        out.update(low=lo, high=hi)
    return out


def format_with_error(col: str, value: Any, err: Mapping[str, float] | None) -> str:
    """A cell with its error bar: ``43.0% ± 2.9`` (standard error, points), ``0.0% [0.0–56.2]``
    (95% Wilson interval where the standard error is 0, i.e. a score of 0 or 1) or
    ``3.91 [3.80–4.02]`` (perplexity, 95% bootstrap interval over documents)."""
    text = format_value(col, value)
    if err is None or text == MISSING:
        return text
    if col.startswith(PPL_PREFIX):
        return f"{text} [{err['low']:,.2f}–{err['high']:,.2f}]"
    if err.get("stderr", 0.0) > 0 or "low" not in err:
        return f"{text} ± {100 * err['stderr']:.1f}"
    return f"{text} [{100 * err['low']:.1f}–{100 * err['high']:.1f}]"


def render_table(arms: Sequence[Mapping[str, Any]]) -> str:
    """The results table as GitHub markdown (best trained value per metric in bold), each score
    with its error bar (see ``format_with_error``)."""
    df = results_table(arms)
    best = best_arms(arms, df)
    by_name = {_arm_name(a): a for a in arms}
    cols = list(df.columns)
    mcols = set(metric_columns(df))
    headers = ["arm", "description"] + [column_label(c) for c in cols[2:]]
    align = [":---", ":---"] + ["---:"] * (len(cols) - 2)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    for _, row in df.iterrows():
        cells = []
        for col in cols:
            value = None if pd.isna(row[col]) else row[col]
            if col in mcols:
                text = format_with_error(col, value, error_bar(by_name[row["arm"]], col))
            else:
                text = format_value(col, value)
            if row["arm"] in best.get(col, ()) and text != MISSING:
                text = f"**{text}**"
            cells.append(_md_cell(text))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(me: Mapping[str, Any], other: Mapping[str, Any], col: str):
    """The paired test of ``col`` between two arms over their shared documents, or None when
    either lacks per-document results (``loram.evaluate.stats``)."""
    from loram.evaluate import stats

    a, b = me.get("_per_doc") or {}, other.get("_per_doc") or {}
    if col.startswith(PPL_PREFIX):
        key = "ppl/" + col[len(PPL_PREFIX) :]
        da, db = a.get(key), b.get(key)
        if not da or not db:
            return None
        ids = sorted(set(da) & set(db))
        if not ids:
            return None
        return stats.compare_ppl([da[i] for i in ids], [db[i] for i in ids])
    if col == "csr":
        tasks = [t for t in CSR_TASK_NAMES if f"{t}/acc" in a and f"{t}/acc" in b]
        if not tasks:
            return None
        ga, gb = {}, {}
        for t in tasks:
            ids = sorted(set(a[f"{t}/acc"]) & set(b[f"{t}/acc"]))
            if not ids:
                return None
            ga[t] = [a[f"{t}/acc"][i] for i in ids]
            gb[t] = [b[f"{t}/acc"][i] for i in ids]
        return stats.compare_groups(ga, gb)
    da, db = a.get(col), b.get(col)
    if not da or not db:
        return None
    ids = sorted(set(da) & set(db))
    if not ids:
        return None
    return stats.compare([da[i] for i in ids], [db[i] for i in ids])


def verdict_sentences(arms: Sequence[Mapping[str, Any]]) -> list[str]:
    """One sentence per (LoRAM arm, baseline arm) pair comparing every shared metric.

    "better" / "worse" only where a paired test over the same documents is significant at
    95% (McNemar for 0/1 per-document scores, else a paired bootstrap); otherwise "no
    detectable difference (n = documents)". Without per-document results no verdict is given.
    """
    df = results_table(arms).set_index("arm")
    cols = metric_columns(df.reset_index())
    lorams = [a for a in arms if _arm_kind(a) == "loram"]
    baselines = [a for a in arms if _arm_kind(a) in BASELINE_KINDS]
    sentences = []
    for me in lorams:
        mine_name = _arm_name(me)
        for other in baselines:
            name = _arm_name(other)
            parts, tally = [], {"better": 0, "worse": 0, "none": 0}
            for col in cols:
                mine, theirs = df.at[mine_name, col], df.at[name, col]
                if pd.isna(mine) or pd.isna(theirs):
                    continue
                head = (
                    f"{column_label(col)} {format_value(col, mine)} vs {format_value(col, theirs)}"
                )
                cmp = _paired(me, other, col)
                if cmp is None:
                    parts.append(f"{head} (no per-document results: no verdict)")
                    tally["none"] += 1
                    continue
                if cmp.verdict in ("better", "worse"):
                    tally[cmp.verdict] += 1
                    parts.append(f"{head} ({cmp.verdict}, p = {cmp.p_value:.2g}, {cmp.test})")
                else:
                    tally["none"] += 1
                    parts.append(f"{head} ({cmp.verdict})")
            if parts:
                sentences.append(
                    f"{mine_name} vs {name}: " + "; ".join(parts) + f" — better on "
                    f"{tally['better']}, worse on {tally['worse']}, no verdict on "
                    f"{tally['none']} of {len(parts)}."
                )
            else:
                sentences.append(f"{mine_name} vs {name}: no metric in common.")
    return sentences


def _how_to_read(arms: Sequence[Mapping[str, Any]]) -> list[str]:
    df = results_table(arms)
    mcols = metric_columns(df)
    lines = [
        "**How to read.** One row per arm. *Params held in training* is the number of base-model "
        "parameters resident while the adapter trains; *reduction ×* is original / held. "
        "Accuracies are percentages (higher is better); perplexities are lower-is-better. "
        f"Bold marks the best value of each of the {len(mcols)} metric column(s) among the "
        f"trained (non-original) arms (the highest value, not by itself a significant "
        f"difference: see the verdicts); {MISSING} means not measured. Error bars: ± one "
        "standard error over documents (percentage points); [a–b] a 95% interval (Wilson for "
        "a score of 0% or 100%, bootstrap over documents for perplexities). A verdict says "
        "better / worse only when a paired test over the same documents (McNemar for 0/1 "
        "scores, else a paired bootstrap) is significant at 95%."
    ]
    sentences = verdict_sentences(arms)
    if sentences:
        lines.append("")
        lines += [f"- {s}" for s in sentences]
    elif not any(_arm_kind(a) == "loram" for a in arms):
        lines += ["", "No arm of kind `loram` was evaluated, so there is no LoRAM verdict."]
    return lines


def _fmt_meta(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt_meta(v)}" for k, v in value.items()) or MISSING
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_meta(v) for v in value) or MISSING
    return MISSING if value is None else str(value)


def render_markdown(
    arms: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any] | None = None,
    images: Mapping[str, str] | None = None,
    sweep_rows: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The full report: table, how-to-read verdicts, run metadata, optional images and sweep."""
    out = ["# LoRAM results", "", TABLE_START, render_table(arms), TABLE_END, ""]
    out += _how_to_read(arms)
    notes = footnotes(arms)
    if notes:
        out += ["", "**Evaluation protocol**", ""] + [f"- {_md_cell(n)}" for n in notes]
    if meta:
        out += ["", "**Run**", ""]
        out += [f"- {k}: {_md_cell(_fmt_meta(v))}" for k, v in meta.items()]
    if sweep_rows:
        out += ["", "## Pruning-ratio sweep", "", render_sweep_table(sweep_rows)]
    titles = {
        "loss": "Training / validation loss",
        "benchmarks": "Benchmarks",
        "perplexity": "Perplexity",
        "sweep": "Sweep over pruning ratio",
    }
    if images:
        out += ["", "## Plots"]
        for key, rel in images.items():
            out += ["", f"![{titles.get(key, key)}]({rel})"]
    return "\n".join(out) + "\n"


def footnotes(arms: Sequence[Mapping[str, Any]]) -> list[str]:
    """Protocol notes from the arms' provenance: documents, shots and splits per task (with
    the split used where the stock one is missing offline), seeds and the sandbox mode."""
    lines: list[str] = []
    seen: dict[str, str] = {}
    sandboxes: dict[str, list[str]] = {}
    seeds = None
    for arm in arms:
        bench = (arm.get("_provenance") or {}).get("bench") or {}
        seeds = seeds or bench.get("seeds")
        for task, info in (bench.get("tasks") or {}).items():
            text = (
                f"{task}: {info.get('n_docs')} of {info.get('n_docs_total')} documents, "
                f"{info.get('num_fewshot')}-shot, {info.get('split_note', '')}"
            )
            if task == "humaneval" and info.get("n_samples") is not None:
                temp = info.get("temperature")
                text += f"; {info['n_samples']} completion(s) per problem, " + (
                    "greedy" if not temp else f"temperature {temp}"
                )
            seen.setdefault(task, text)
        sb = bench.get("sandbox")
        if isinstance(sb, Mapping) and sb.get("isolation"):
            label = f"{sb['isolation']} (eval.sandbox: {sb.get('policy', '?')})"
            sandboxes.setdefault(label, []).append(_arm_name(arm))
        for task, why in (bench.get("skipped") or {}).items():
            seen.setdefault(f"{task} (skipped)", f"{task} not run: {why}")
    lines += list(seen.values())
    if seeds:
        lines.append("seeds: " + ", ".join(f"{k} {v}" for k, v in seeds.items()))
    for label, names in sandboxes.items():
        lines.append(f"HumanEval code ran in the sandbox mode {label} for: {', '.join(names)}")
    return lines


def readme_table(path_to_results_md: str | Path) -> str:
    """Just the results table block of ``reports/results.md`` (for embedding in the README)."""
    text = Path(path_to_results_md).read_text(encoding="utf-8")
    if TABLE_START in text and TABLE_END in text:
        return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n")
    block: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    if not block:
        raise ValueError(f"no markdown table in {path_to_results_md}")
    return "\n".join(block)


# ---------------------------------------------------------------------------------------------
# sweep


def _walk_revisions(node: Any) -> Iterable[Mapping[str, Any]]:
    """Every revision record (a dict whose ``data`` holds ``params``/``metrics``) in the output."""
    if isinstance(node, Mapping):
        data = node.get("data")
        if isinstance(data, Mapping) and ("params" in data or "metrics" in data):
            yield node
        for key, value in node.items():
            if key != "data":
                yield from _walk_revisions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_revisions(item)


def _file_data(entry: Any) -> Mapping[str, Any]:
    if isinstance(entry, Mapping) and isinstance(entry.get("data"), Mapping):
        return entry["data"]
    return {}


def sweep_rows_from_dvc_exp_json(obj: Any, arm: str = "loram") -> list[dict[str, Any]]:
    """Parse ``dvc exp show --json`` output into sweep rows for ``arm``.

    DVC 3.x prints a list of commits, each ``{"rev", "name", "data": {"params": {file: {"data":
    {...}}}, "metrics": {file: {"data": {...}}}, ...}, "error", "experiments": [{"revs": [same
    shape], "name", "executor"}] | null}``; the first entry is the ``workspace``. Older dict
    layouts with the same ``data`` records are accepted too. Rows: ``ratio``, ``method``
    (``prune.*`` params, else the metrics), ``aligned``, ``quantize``, ``arm``, ``ppl``,
    ``bench``, ``name``, ``rev``. Revisions without the arm's metrics or a ratio are skipped; the
    workspace, when identical to an experiment, is dropped.
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    records = list(_walk_revisions(obj))
    # Workspace last so that a committed or named experiment wins the de-duplication.
    records.sort(key=lambda r: r.get("rev") == "workspace")
    for rec in records:
        data = rec["data"]
        params: dict[str, Any] = {}
        for entry in (data.get("params") or {}).values():
            for k, v in _file_data(entry).items():
                params.setdefault(k, v)
        metrics = None
        for path, entry in (data.get("metrics") or {}).items():
            d = _file_data(entry)
            # Training metrics carry the arm name too: take the file with the evaluation.
            if not ("ppl" in d or "bench" in d):
                continue
            if d.get("arm") == arm or (d and Path(str(path)).stem == arm and "arm" not in d):
                metrics = d
                break
        if metrics is None:
            continue
        prune = params.get("prune") if isinstance(params.get("prune"), Mapping) else {}
        ratio = _num(prune.get("ratio", metrics.get("ratio")))
        if ratio is None:
            continue
        align = params.get("align") if isinstance(params.get("align"), Mapping) else {}
        train = params.get("train") if isinstance(params.get("train"), Mapping) else {}
        aligned = align.get("enabled", metrics.get("aligned"))
        row = {
            "ratio": ratio,
            "method": str(prune.get("method", metrics.get("method", "?"))),
            "aligned": aligned if isinstance(aligned, bool) else None,
            "quantize": train.get("quantize", metrics.get("quantize")),
            "arm": arm,
            "ppl": dict(metrics.get("ppl") or {}),
            "bench": {k: v for k, v in (metrics.get("bench") or {}).items() if k != "metadata"},
        }
        key = json.dumps({"p": params, "m": row}, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        row["name"] = rec.get("name") or data.get("name") or rec.get("rev")
        row["rev"] = rec.get("rev")
        rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], r["ratio"], str(r["name"])))


def dvc_exp_show_json(cwd: str | Path = ".") -> Any:
    """Run ``dvc exp show --json`` in ``cwd`` and return the parsed output."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    proc = subprocess.run(
        [dvc, "exp", "show", "--json"], cwd=cwd, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ValueError(f"dvc exp show --json failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


SWEEP_KEY_BENCH = [
    "csr",
    "gsm8k/exact_match_strict",
    "gsm8k/exact_match_flexible",
    "humaneval/pass@1",
]


def render_sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the sweep: method / ratio / experiment → perplexities and key accuracies."""
    ppl_keys = _ppl_order(k for r in rows for k in _ppl_values(r))
    bench_keys = [k for k in SWEEP_KEY_BENCH if any(k in _bench_values(r) for r in rows)]
    cols = ["method", "ratio", "aligned", "experiment"]
    cols += [f"{k} ppl" for k in ppl_keys] + [BENCH_LABELS.get(k, k) for k in bench_keys]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join(["---"] * len(cols)) + " |"]
    for r in sorted(rows, key=lambda r: (str(r.get("method")), _num(r.get("ratio")) or 0.0)):
        ratio = _num(r.get("ratio"))
        aligned = r.get("aligned")
        cells = [
            str(r.get("method") or MISSING),
            MISSING if ratio is None else f"{ratio:g}",
            MISSING if not isinstance(aligned, bool) else ("yes" if aligned else "no"),
            str(r.get("name") or MISSING),
        ]
        ppl, bench = _ppl_values(r), _bench_values(r)
        cells += [format_value(PPL_PREFIX + k, ppl.get(k)) for k in ppl_keys]
        cells += [format_value(k, bench.get(k)) for k in bench_keys]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def plot_losses(loss_dir: str | Path, out_png: str | Path) -> Path | None:
    """Training loss (line) and validation loss (markers) per arm against step; None if no data."""
    df = read_losses(loss_dir)
    if df.empty or (df["loss"].dropna().empty and df["val_loss"].dropna().empty):
        return None
    fig, (ax,) = _new_figure(7.5, 4.5)
    colors = _colors(df["arm"].unique())
    for arm, g in df.groupby("arm", sort=True):
        g = g.sort_values("step")
        tr = g.dropna(subset=["loss"])
        if not tr.empty:
            ax.plot(tr["step"], tr["loss"], "-", color=colors[arm], lw=1.2, label=f"{arm} train")
        va = g.dropna(subset=["val_loss"])
        if not va.empty:
            ax.plot(va["step"], va["val_loss"], "o", color=colors[arm], ms=5, label=f"{arm} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss (lines) and validation loss (markers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def _colors(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _plain_log_ticks(ax: Any) -> None:
    """Log y axis with plain-number tick labels (3, 10, 30 rather than 3×10⁰)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    fmt = FuncFormatter(lambda y, _pos: f"{y:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float | None]]) -> None:
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    n = max(len(series), 1)
    width = 0.8 / n
    colors = _colors(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [float("nan") if v is None else v for v in values]
        ax.bar(xs, ys, width=width, label=name, color=colors[name])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)


def plot_benchmarks(arms: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path | None:
    """Grouped bars, one group per accuracy-like benchmark metric, one bar per arm."""
    values = {_arm_name(a): _bench_values(a) for a in arms}
    keys = [
        k
        for k in _bench_order(k for v in values.values() for k in v)
        if all(0.0 <= v[k] <= 1.0 for v in values.values() if k in v)
    ]
    if not keys:
        return None
    fig, (ax,) = _new_figure(max(6.0, 0.9 * len(keys) + 2), 4.5)
    series = {name: [v.get(k) for k in keys] for name, v in values.items()}
    _grouped_bars(ax, [BENCH_LABELS.get(k, k) for k in keys], series)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title("Benchmarks (higher is better)")
    return save_figure(fig, out_png)


def plot_perplexity(arms: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path | None:
    """Grouped bars per perplexity set, one bar per arm, log-scale y."""
    values = {_arm_name(a): _ppl_values(a) for a in arms}
    keys = [k for k in _ppl_order(k for v in values.values() for k in v)]
    keys = [k for k in keys if any(0 < v.get(k, 0) < math.inf for v in values.values())]
    if not keys:
        return None
    fig, (ax,) = _new_figure(max(6.0, 1.4 * len(keys) + 2), 4.5)
    series = {
        name: [x if x is not None and 0 < x < math.inf else None for x in (v.get(k) for k in keys)]
        for name, v in values.items()
    }
    _grouped_bars(ax, keys, series)
    _plain_log_ticks(ax)
    ax.set_ylabel("perplexity (log)")
    ax.set_title("Perplexity (lower is better)")
    return save_figure(fig, out_png)


def plot_sweep(rows: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path | None:
    """Perplexity (and CSR / GSM8K accuracy when present) vs pruning ratio, one line per method.

    Returns None (writing nothing) when fewer than two distinct ratios exist.
    """
    recs = []
    for r in rows:
        ratio = _num(r.get("ratio"))
        if ratio is None:
            continue
        rec = {"method": str(r.get("method") or "?"), "ratio": ratio}
        rec.update({PPL_PREFIX + k: v for k, v in _ppl_values(r).items()})
        rec.update(_bench_values(r))
        recs.append(rec)
    df = pd.DataFrame(recs)
    if df.empty or df["ratio"].nunique() < 2:
        return None
    df = df.groupby(["method", "ratio"], as_index=False).mean(numeric_only=True)
    ppl_cols = [PPL_PREFIX + k for k in _ppl_order(c[4:] for c in df if c.startswith(PPL_PREFIX))]
    acc_cols = [
        c for c in ("csr", "gsm8k/exact_match_strict", "gsm8k/exact_match_flexible") if c in df
    ]
    panels = [c for c in (ppl_cols, acc_cols) if c]
    if not panels:
        return None
    fig, axes = _new_figure(6.0 * len(panels), 4.5, ncols=len(panels))
    colors = _colors(sorted(df["method"].unique()))
    styles = ["o-", "s--", "^:", "d-.", "v-", "x--"]
    for ax, cols in zip(axes, panels):
        for method, g in df.groupby("method", sort=True):
            g = g.sort_values("ratio")
            for j, col in enumerate(cols):
                sub = g.dropna(subset=[col])
                if sub.empty:
                    continue
                ax.plot(
                    sub["ratio"],
                    sub[col],
                    styles[j % len(styles)],
                    color=colors[method],
                    label=f"{method}: {column_label(col)}",
                )
        ax.set_xlabel("pruning ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("perplexity" if panels[0] is ppl_cols else "accuracy")
    if panels[0] is ppl_cols:
        _plain_log_ticks(axes[0])
        axes[0].set_title("Perplexity vs pruning ratio")
    if acc_cols:
        axes[-1].set_ylabel("accuracy")
        axes[-1].set_title("Accuracy vs pruning ratio")
    return save_figure(fig, out_png)


# ---------------------------------------------------------------------------------------------
# report


def results_records(df: pd.DataFrame, arms_in: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The table as ``{"arms": {arm: {column: value}}}`` (DVC metrics ignore top-level lists):
    numbers only (the description stays in the markdown), with ``<column>_stderr`` /
    ``_ci95_low`` / ``_ci95_high`` where the arm has error bars."""
    by_name = {_arm_name(a): a for a in arms_in}
    mcols = metric_columns(df)
    arms: dict[str, Any] = {}
    for rec in df.to_dict(orient="records"):
        name = str(rec.pop("arm"))
        rec.pop("description", None)
        for col in mcols if name in by_name else ():
            err = error_bar(by_name[name], col)
            if err:
                if "stderr" in err:
                    rec[f"{col}_stderr"] = err["stderr"]
                if "low" in err:
                    rec[f"{col}_ci95_low"], rec[f"{col}_ci95_high"] = err["low"], err["high"]
        clean: dict[str, Any] = {}
        for k, v in rec.items():
            if isinstance(v, float) and math.isnan(v):
                v = None
            elif k == "params_held" and isinstance(v, float) and v.is_integer():
                v = int(v)
            clean[k] = v
        arms[name] = clean
    return {"arms": arms}


def write_report(
    metrics_dir: str | Path,
    loss_dir: str | Path,
    out_dir: str | Path = "reports",
    meta: Mapping[str, Any] | None = None,
    sweep_rows: Sequence[Mapping[str, Any]] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, Path]:
    """Write results.md, results.json and the PNG plots into ``out_dir``; return their paths.
    ``only``: the arms to report (see :func:`collect_arms`)."""
    arms = collect_arms(metrics_dir, only)
    not_run = skipped_arms(metrics_dir, only)
    if not_run:
        meta = {**(meta or {}), "not run": [f"{k} ({why})" for k, why in not_run.items()]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    plots = {
        "loss": lambda p: plot_losses(loss_dir, p),
        "benchmarks": lambda p: plot_benchmarks(arms, p),
        "perplexity": lambda p: plot_perplexity(arms, p),
    }
    if sweep_rows:
        plots["sweep"] = lambda p: plot_sweep(sweep_rows, p)
    for key, fn in plots.items():
        written = fn(out / f"{key}.png")
        if written is not None:
            paths[key] = Path(written)
    images = {k: p.name for k, p in paths.items()}
    md = render_markdown(arms, meta, images=images, sweep_rows=sweep_rows)
    paths["markdown"] = atomic_write_text(out / "results.md", md)
    records = results_records(results_table(arms), arms)
    paths["json"] = atomic_write_text(out / "results.json", json.dumps(records, indent=2) + "\n")
    return paths


def default_meta(
    metrics_dir: str | Path,
    loss_dir: str | Path,
    out: str | Path,
    params_file: str | Path = "params.yaml",
    sweep_json: str | None = None,
    sweep_from_dvc: bool = False,
) -> dict[str, Any]:
    command = f"loram report --metrics-dir {metrics_dir} --loss-dir {loss_dir} --out {out}"
    if sweep_json:
        command += f" --sweep-json {sweep_json}"
    elif sweep_from_dvc:
        command += " --sweep-from-dvc"
    meta: dict[str, Any] = {
        "command": command,
        "machine": f"{platform.node()} ({platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()})",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    params = Path(params_file)
    if params.is_file():
        try:
            import yaml

            doc = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
        except Exception:  # noqa: BLE001 - metadata is best effort
            doc = {}
        if isinstance(doc.get("eval"), Mapping):
            meta["limits"] = dict(doc["eval"])
    align = _alignment_effect(Path(metrics_dir).parent)
    if align:
        meta["alignment (pruned model, general-text perplexity before → after)"] = align
    return meta


def _alignment_effect(metrics_root: Path) -> dict[str, str]:
    """Per pruned base: held-out general-text perplexity of the pruned model before/after align."""
    files = {p.parent.name: p for p in sorted(metrics_root.glob("bases/*/align.json"))}
    out = {}
    for name, path in files.items():
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if d.get("enabled") and d.get("val_ppl_before") is not None:
            out[name] = (
                f"{d['val_ppl_before']:.2f} → {d['val_ppl_after']:.2f} ({d.get('tokens', 0):,} tokens)"
            )
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """Build reports/results.md, results.json and the plots from the arm metrics."""
    rows = None
    if args.sweep_json:
        rows = sweep_rows_from_dvc_exp_json(json.loads(Path(args.sweep_json).read_text()))
    elif args.sweep_from_dvc:
        rows = sweep_rows_from_dvc_exp_json(dvc_exp_show_json())
    meta = default_meta(
        args.metrics_dir, args.loss_dir, args.out, args.params, args.sweep_json, args.sweep_from_dvc
    )
    paths = write_report(args.metrics_dir, args.loss_dir, args.out, meta=meta, sweep_rows=rows)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def add_parser(sub: Any) -> None:
    """Register the ``report`` sub-command."""
    p = sub.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__)
    p.add_argument("--metrics-dir", default="metrics/arms", help="(default: metrics/arms)")
    p.add_argument("--loss-dir", default="plots/loss", help="(default: plots/loss)")
    p.add_argument("--out", default="reports", help="(default: reports)")
    p.add_argument("--params", default="params.yaml", help="read eval limits for the run metadata")
    p.add_argument(
        "--sweep-from-dvc",
        action="store_true",
        help="run `dvc exp show --json` and add the pruning-ratio sweep table and plot",
    )
    p.add_argument("--sweep-json", default=None, help="saved `dvc exp show --json` output")
    p.set_defaults(func=cmd_report)
