"""The training-cost benchmark runs end to end on the tiny model and reports every arm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_cost_benchmark_on_tiny_model(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_cost.py"), "--model", "tiny-llama",
         "--steps", "3", "--seq-len", "64", "--arms", "lora_full,loram_stru,qloram_stru",
         "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    arms = res["arms"]
    assert set(arms) == {"lora_full", "loram_stru", "qloram_stru"}
    full, stru, q = arms["lora_full"], arms["loram_stru"], arms["qloram_stru"]
    # Pruning at 0.65 holds fewer parameters; NF4 holds the same ones in fewer bytes.
    assert stru["params_held"] < full["params_held"]
    assert q["params_held"] == stru["params_held"] and q["param_bytes"] < stru["param_bytes"]
    assert full["memory_vs_lora_full"] == 1.0 and full["speed_vs_lora_full"] == 1.0
    for r in arms.values():
        assert r["peak_mib"] > 0 and r["seconds_per_step"] > 0 and r["seq_len"] == 64
    assert "lora_full" in proc.stdout and "x mem" in proc.stdout  # the printed table
