"""Stage ``data``: training / validation / out-of-domain / alignment rows as jsonl."""

from __future__ import annotations

from pathlib import Path

from loram.config import DataParams
from loram.pipeline.common import check_outputs, write_metrics

NAME = "data"
SECTIONS = ("data",)
OPTIONS = {"out": "artifacts/data", "metrics": "metrics/data.json"}


def run(p: DataParams, *, out: str, metrics: str) -> dict:
    from loram.data import load_rows, split_rows
    from loram.fsio import atomic_dir

    check_outputs("data", out, metrics=metrics)
    train_all = load_rows(p.train)
    if "text" in train_all[0]:
        raise ValueError(
            f"data.train source {p.train.name!r} is plain text; LoRA needs instruction rows"
        )
    train, val = split_rows(train_all, p.val_fraction, p.max_val_rows, p.seed)
    stats = {"train": len(train), "val": len(val), "ood": {}}
    with atomic_dir(out, "data") as tmp:
        _write_data_dir(tmp, p, train, val, stats)
    write_metrics(metrics, stats)
    return stats


def _write_data_dir(tmp: Path, p: DataParams, train: list, val: list, stats: dict) -> None:
    from loram.data import load_rows, split_rows, write_jsonl

    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "val.jsonl", val)
    for src in p.ood:
        rows = load_rows(src)[: p.max_ood_rows]
        name = Path(src.name).stem if src.kind == "file" else src.name.replace("/", "_")
        write_jsonl(tmp / f"ood_{name}.jsonl", rows)
        stats["ood"][name] = len(rows)
    text = load_rows(p.align)
    text_rows = [r if "text" in r else {"text": r["prompt"] + "\n" + r["response"]} for r in text]
    align_train, align_val = split_rows(
        text_rows, p.val_fraction, max(1, p.max_val_rows // 10), p.seed
    )
    write_jsonl(tmp / "align.jsonl", align_train)
    write_jsonl(tmp / "align_val.jsonl", align_val)
    stats["align_docs"] = len(align_train)
    stats["align_val_docs"] = len(align_val)
