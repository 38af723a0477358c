"""``baselines.lora_full``: LoRA on the full model switched off (false, or auto on a float32 CPU
base) still writes every output its three stages declare, records why, and the report leaves
the arm out; auto on a bf16 base, and true, train it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from tinyproject import SOURCES, TRAIN, write_sources

from loram.cli import main
from loram.pipeline.common import SKIPPED

FULL = [
    "--model", "artifacts/base", "--arm", "lora_full", "--out", "artifacts/lora_full/adapter",
    "--checkpoints", "artifacts/checkpoints/lora_full",
    "--metrics", "metrics/train/lora_full.json", "--plots", "plots/loss/lora_full.csv",
]  # fmt: skip


def _project(tmp_path: Path, monkeypatch, lora_full, dtype: str = "float32") -> None:
    params = {
        "base": {"model": "tiny-llama", "dtype": dtype},
        "data": SOURCES,
        "train": TRAIN,
        "eval": {"ppl_max_rows": 2, "ppl_seq_len": 64, "batch_size": 2, "tasks": []},
        "baselines": {"lora_full": lora_full},
        "arms": {},
        "bases": {},
        "ablations": {"noalign": {}, "no_recovery": {}},
    }
    write_sources(tmp_path, n_train=16, n_ood=4, n_align=24)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("LORAM_DEVICE", raising=False)
    assert main(["data", "--out", "artifacts/data", "--metrics", "metrics/data.json"]) == 0
    assert main(["base"]) == 0


def _read(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def test_switched_off_lora_full_records_why_in_every_output_and_the_report_leaves_it_out(
    tmp_path, monkeypatch
):
    _project(tmp_path, monkeypatch, False)
    assert main(["train", *FULL]) == 0
    why = "baselines.lora_full is false"
    assert _read("metrics/train/lora_full.json") == {"arm": "lora_full", "skipped": why}
    adapter = Path("artifacts/lora_full/adapter")
    assert _read(str(adapter / SKIPPED)) == {"reason": why}
    assert not (adapter / "adapter_model.safetensors").exists()
    assert Path("artifacts/checkpoints/lora_full").is_dir()  # dvc.yaml declares it
    assert Path("plots/loss/lora_full.csv").read_text().splitlines() == [
        "arm,step,loss,val_loss,lr"
    ]
    merge = ["--adapter", str(adapter), "--pruned", "none", "--out", "artifacts/lora_full/merged"]
    assert main(["merge", *merge, "--metrics", "metrics/merge/lora_full.json"]) == 0
    assert _read("metrics/merge/lora_full.json") == {"skipped": why}
    assert _read(f"artifacts/lora_full/merged/{SKIPPED}") == {"reason": why}
    ev = ["--model", "artifacts/lora_full/merged", "--tokenizer", "artifacts/base"]
    assert main(["evaluate", "--arm", "lora_full", "--kind", "lora_full", *ev,
                 "--out", "metrics/arms/lora_full.json"]) == 0  # fmt: skip
    rec = _read("metrics/arms/lora_full.json")
    assert rec["skipped"] == why and "ppl" not in rec
    assert Path("metrics/details/lora_full/samples.jsonl").read_text() == ""
    assert main(["evaluate", "--arm", "original", "--kind", "original",
                 "--model", "artifacts/base", "--out", "metrics/arms/original.json"]) == 0  # fmt: skip
    assert main(["report"]) == 0
    md = Path("reports/results.md").read_text(encoding="utf-8")
    assert f"lora_full ({why})" in md
    assert list(_read("reports/results.json")["arms"]) == ["original"]
    # Switched back on, the same stage replaces its own record with a trained adapter.
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["baselines"]["lora_full"] = True
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert main(["train", *FULL]) == 0
    assert "skipped" not in _read("metrics/train/lora_full.json")
    assert not (adapter / SKIPPED).exists() and (adapter / "adapter_config.json").is_file()


@pytest.mark.parametrize(("dtype", "trained"), [("float32", False), ("bfloat16", True)])
def test_auto_trains_lora_full_unless_the_base_is_float32_on_the_cpu(
    tmp_path, monkeypatch, dtype, trained
):
    _project(tmp_path, monkeypatch, "auto", dtype)
    assert main(["train", *FULL]) == 0
    rec = _read("metrics/train/lora_full.json")
    assert ("skipped" not in rec) is trained
    assert (Path("artifacts/lora_full/adapter") / SKIPPED).exists() is not trained
    if not trained:
        assert "auto" in rec["skipped"] and "float32" in rec["skipped"]


def test_a_bad_lora_full_value_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("baselines: {lora_full: maybe}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "baselines.lora_full" in err and "maybe" in err
    assert os.path.exists("params.yaml")
