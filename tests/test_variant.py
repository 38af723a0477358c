"""Stage ``variant@NAME`` on tiny models: plain LoRA on another model (kind lora) and that model
evaluated untuned (kind original), each in one stage."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml
from tinyproject import SOURCES, TRAIN, write_sources

from loram.cli import main

PARAMS = {
    "base": {"model": "tiny-llama"},
    "data": SOURCES,
    "train": TRAIN,
    "eval": {"ppl_max_rows": 2, "ppl_seq_len": 64, "batch_size": 2, "tasks": []},
    "variants": {
        "small": {"base": {"model": "tiny-qwen2"}, "description": "LoRA on the other model"},
        "small_untuned": {"kind": "original", "base": {"model": "tiny-qwen2", "dtype": "bfloat16"}},
    },
}


def test_variant_kinds(tmp_path, monkeypatch):
    write_sources(tmp_path, n_train=16, n_ood=4, n_align=24)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    assert main(["data", "--out", "artifacts/data", "--metrics", "metrics/data.json"]) == 0
    (tmp_path / "artifacts" / "base").mkdir()  # the stage's DVC input (the main base), unused

    assert main(["variant", "--name", "small_untuned"]) == 0
    rec = json.loads(Path("metrics/arms/small_untuned.json").read_text())
    assert rec["kind"] == "original" and rec["description"] == "tiny-qwen2, no fine-tuning"
    assert set(rec["ppl"]) >= {"in_domain", "general_text"}
    model = Path("artifacts/variants/small_untuned/model")
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["dtype"] == "bfloat16"
    assert not Path("artifacts/variants/small_untuned/work").exists()
    # every output dvc.yaml declares for a variant stage exists (DVC fails the stage otherwise)
    assert Path("plots/loss/small_untuned.csv").is_file()
    assert Path("metrics/variants/small_untuned").is_dir()

    assert main(["variant", "--name", "small"]) == 0
    rec = json.loads(Path("metrics/arms/small.json").read_text())
    assert rec["kind"] == "lora_small" and rec["description"] == "LoRA on the other model"
    assert rec["train_seconds"] > 0 and rec["peak_rss_mib"] > 0
    if sys.platform.startswith("linux"):  # the training window (loram.train.reset_peak_rss)
        assert 0 < rec["train_peak_rss_mib"] <= rec["peak_rss_mib"]
    assert (Path("artifacts/variants/small/merged") / "config.json").is_file()
    assert Path("metrics/variants/small/train.json").is_file()
    assert not Path("artifacts/variants/small/work").exists()

    assert main(["variant", "--name", "nope"]) == 2
