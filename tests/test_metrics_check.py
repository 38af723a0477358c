"""Metrics files hold numbers; provenance and per-document results go next to them.

``scripts/ci_pipeline.py`` fails when a non-numeric key of a fresh run differs from the
committed baseline (``check_non_numeric``); the evaluate stage writes only numbers and fixed
labels to ``--out`` and the rest to ``metrics/details/<arm>``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_ci():
    spec = importlib.util.spec_from_file_location(
        "ci_pipeline", ROOT / "scripts" / "ci_pipeline.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ci_pipeline", mod)
    spec.loader.exec_module(mod)
    return mod


ci = _load_ci()

BASE = {
    "metrics/arms/loram.json": {
        "arm": "loram",
        "aligned": True,
        "ppl": {"in_domain": 12.5},
        "bench": {"csr": 0.41, "csr_stderr": 0.028},
        "sparsity": None,
    }
}


def _copy(obj):
    return json.loads(json.dumps(obj))


def test_numbers_may_change_labels_may_not():
    new = _copy(BASE)
    new["metrics/arms/loram.json"]["ppl"]["in_domain"] = 13.0
    new["metrics/arms/loram.json"]["bench"]["csr_stderr"] = 0.03
    new["metrics/arms/loram.json"]["sparsity"] = 0.5
    assert ci.check_non_numeric(BASE, new) == []
    new["metrics/arms/loram.json"]["aligned"] = False
    (problem,) = ci.check_non_numeric(BASE, new)
    assert "'aligned' changed: True -> False" in problem


def test_a_machine_path_in_a_fresh_run_fails_the_check():
    """The issue's case: absolute cache paths under bench.metadata made dvc metrics diff noise."""
    new = _copy(BASE)
    new["metrics/arms/loram.json"]["bench"]["metadata"] = {
        "tasks": {"arc_easy": {"data_files": {"test": "/root/.cache/loram/eval/arc_easy-x.jsonl"}}}
    }
    (problem,) = ci.check_non_numeric(BASE, new)
    assert "metrics/arms/loram.json" in problem and "bench.metadata.tasks.arc_easy" in problem
    assert "not in the baseline" in problem
    gone = _copy(BASE)
    del gone["metrics/arms/loram.json"]["arm"]
    assert "'arm' (baseline 'loram') is missing" in ci.check_non_numeric(BASE, gone)[0]


def test_committed_ci_baseline_metrics_hold_no_paths_or_provenance():
    tree = ci.read_metric_tree(ROOT / "ci" / "metrics")
    assert tree
    for path, doc in tree.items():
        for key, value in ci.flatten(doc).items():
            assert "metadata" not in key, (path, key)
            if isinstance(value, str):
                assert "/" not in value and "\\\\" not in value, (path, key, value)


def test_evaluate_stage_splits_metrics_from_details(tmp_path, monkeypatch):
    from loram.config import EvalParams
    from loram.pipeline import evaluate

    provenance = {"bench": {"tasks": {"piqa": {"split_note": "few-shot from validation"}}}}
    samples = [{"task": "piqa", "doc_id": 0, "scores": {"acc": 1.0}}]

    def fake_model(model_dir, adapter, data_dir, p, tokenizer_dir=None):
        return {
            "ppl": {"in_domain": 3.0},
            "ppl_ci95": {"in_domain": {"low": 2.5, "high": 3.5}},
            "bench": {"piqa/acc": 1.0, "piqa/acc_stderr": 0.0},
            "eval_seconds": 1.0,
            "provenance": _copy(provenance),
            "samples": _copy(samples),
        }

    monkeypatch.setattr(evaluate, "evaluate_model", fake_model)
    out = tmp_path / "metrics" / "arms" / "x.json"
    rec = evaluate.run(EvalParams(), model="m", data="d", arm="x", kind="loram", out=str(out))
    metrics = json.loads(out.read_text())
    assert metrics == rec and "provenance" not in metrics and "samples" not in metrics
    leaves = ci.flatten(metrics)
    assert all(ci.is_number(v) or k in ("arm", "kind", "description") for k, v in leaves.items())
    details = tmp_path / "metrics" / "details" / "x"
    assert json.loads((details / "provenance.json").read_text()) == {"arm": "x", **provenance}
    lines = (details / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == samples


def test_evaluate_stops_before_the_model_when_the_sandbox_is_unavailable(
    tmp_path, monkeypatch, capsys
):
    """With namespaces forbidden, the default (strict) HumanEval run stops with a clear
    one-line error before any model work, instead of scoring in a weaker sandbox."""
    from loram.cli import main
    from loram.evaluate import sandbox

    weak = sandbox.SandboxInfo(
        "rlimits",
        "python3",
        (),
        ("no network isolation",),
        ("namespaces isolation unavailable: unshare: Operation not permitted",),
    )
    monkeypatch.setattr(sandbox, "sandbox_info", lambda: weak)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("val.jsonl", "align_val.jsonl"):
        (data / name).write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    argv = [
        "evaluate",
        "--model",
        "no-such-model",
        "--data",
        str(data),
        "--out",
        "metrics/arms/x.json",
    ]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "eval.sandbox is 'strict'" in err and "eval.sandbox: rlimits" in err
    assert "Operation not permitted" in err and "no-such-model" not in err
    assert "Traceback" not in err and not (tmp_path / "metrics/arms/x.json").exists()
