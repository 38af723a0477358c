"""Source files of a tiny pipeline project (the data sources its params.yaml points at), shared
by the CLI tests that run the whole pipeline on tiny-llama."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()

SOURCES = {
    "train": {"kind": "file", "name": "src/train.jsonl"},
    "ood": [{"kind": "file", "name": "src/ood.jsonl"}],
    "align": {"kind": "file", "name": "src/align.txt", "format": "text"},
    "max_val_rows": 4,
    "max_ood_rows": 4,
}
"""The ``data`` section that reads the files :func:`write_sources` writes."""

TRAIN = {
    "max_steps": 2,
    "warmup_steps": 0,
    "micro_batch": 2,
    "seq_len": 96,
    "save_every": 2,
    "eval_every": 2,
    "max_val_rows": 2,
}
"""A ``train`` section of two tiny steps, for the tests that train on tiny-llama / tiny-qwen2."""


def rows(n: int, seed: int) -> list[dict]:
    out = []
    for i in range(n):
        w = [WORDS[(seed + i * 7 + k * 3) % len(WORDS)] for k in range(6)]
        out.append({"prompt": f"List {w[0]} and {w[1]}.", "response": " ".join(w)})
    return out


def write_sources(root: Path, n_train: int, n_ood: int, n_align: int) -> None:
    """``src/train.jsonl``, ``src/ood.jsonl`` (instruction rows) and ``src/align.txt``."""
    src = root / "src"
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n_train, 0)))
    (src / "ood.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n_ood, 5)))
    (src / "align.txt").write_text(
        "\n".join(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(30)) for i in range(n_align))
    )
