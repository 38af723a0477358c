"""profiles/headline.yaml and profiles/alignment.yaml: valid, and they say what the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loram.config import load_params
from loram.profiles import apply_profile

ROOT = Path(__file__).resolve().parents[1]


def _apply(tmp_path, name):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_profile(ROOT / "profiles" / name, params)
    return load_params(params), yaml.safe_load(params.read_text())


def test_headline_profile(tmp_path, monkeypatch):
    # Validating the profile must not install anything: an empty cache and wheelhouse would fail.
    monkeypatch.setenv("LORAM_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAM_WHEELHOUSE", str(tmp_path / "none"))
    p, raw = _apply(tmp_path, "headline.yaml")
    assert not (tmp_path / "cache").exists()
    assert p["base"].model == "qwen2.5-coder-1.5b" and p["base"].dtype == "auto"
    v = p["variants"]
    assert {v[k]["base"].dtype for k in v} == {
        "auto"
    }  # every model: bf16 where the CPU is fast at it
    assert {k: (v[k]["spec"].kind, v[k]["base"].model) for k in v} == {
        "coder05": ("original", "qwen2.5-coder-0.5b"),
        "lora05": ("lora", "qwen2.5-coder-0.5b"),
    }
    arms = raw["arms"]
    assert arms["qloram"]["base"] == arms["loram"]["base"] == "stru"  # one prune + align
    assert arms["qloram"]["train"]["quantize"] == "nf4"
    # LoRA on the 0.5B trains with the very recipe of the 1.5B arms (the shared train section).
    assert v["lora05"]["train"] == p["train"]
    e = p["eval"]
    assert e.limit["humaneval"] >= 40 and e.humaneval_n == 1 and e.humaneval_temperature == 0
    assert {"csr", "humaneval"} <= set(e.tasks)


def test_alignment_profile_doses(tmp_path):
    p, raw = _apply(tmp_path, "alignment.yaml")
    bases = {k: raw["bases"][k] for k in ("a0", "a25k", "a100k", "a400k")}
    assert all(b["prune"] == {"ratio": 0.85} for b in bases.values())  # the same pruning
    shared = p["align"]

    def tokens(b):
        a = {**shared.model_dump(), **b.get("align", {})}
        return (
            0
            if not a["enabled"]
            else a["max_steps"] * a["micro_batch"] * a["grad_accum"] * a["seq_len"]
        )

    assert [tokens(b) for b in bases.values()] == [0, 25_600, 102_400, 409_600]
    assert {raw["arms"][f"d{k[1:]}"]["base"] for k in bases} == set(bases)


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_headline_plot(tmp_path):
    """scripts/headline_plot.py: a table row per arm sorted by memory, untuned arms first, a PNG."""
    import json

    hp = _load_script("headline_plot")
    arms = tmp_path / "arms"
    arms.mkdir()
    recs = {
        "original": {
            "kind": "original",
            "ppl": {"in_domain": 2.0},
            "bench": {"humaneval/pass@1": 0.5},
        },
        "lora05": {
            "peak_rss_mib": 9000.0,
            "ppl": {"in_domain": 2.2},
            "bench": {"humaneval/pass@1": 0.3, "humaneval/pass@1_stderr": 0.07},
        },
        "qloram": {
            "peak_rss_mib": 8500.0,
            "ppl": {"in_domain": 1.9},
            "bench": {"humaneval/pass@1": 0.55, "csr": 0.5},
        },
    }
    for name, rec in recs.items():
        (arms / f"{name}.json").write_text(json.dumps(rec))
    out = tmp_path / "h.png"
    assert hp.main(["--metrics", str(arms), "--out", str(out), "--params", ""]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = hp.table(hp.load_arms(arms)).splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["original", "qloram", "lora05"]
    assert "30.0% ± 7.0" in rows[2] and "50.0%" in rows[1] and "| – |" in rows[0]
    assert "9,000.0" in rows[2] and "| 2.20 |" in rows[2]


def test_alignment_plot(tmp_path):
    """scripts/alignment_plot.py: one row per arm of params.yaml, sorted by its base's alignment
    tokens; an unaligned base reports the pruned model's perplexity before alignment."""
    import json

    ap = _load_script("alignment_plot")
    params = tmp_path / "params.yaml"
    params.write_text("arms:\n  d25k: {base: a25k}\n  d0: {base: a0}\n")
    m = tmp_path / "metrics"
    for base, rec in {
        "a0": {"enabled": False, "val_ppl_before": 900.0, "val_ppl_after": 900.0},
        "a25k": {
            "enabled": True,
            "tokens": 25600,
            "val_ppl_before": 900.0,
            "val_ppl_after": 300.0,
            "align_seconds": 60.0,
        },
    }.items():
        (m / "bases" / base).mkdir(parents=True)
        (m / "bases" / base / "align.json").write_text(json.dumps(rec))
    (m / "arms").mkdir()
    for arm, ppl in {"d0": 3.1, "d25k": 3.0, "original": 3.2}.items():
        rec = {
            "ppl": {"in_domain": ppl},
            "ppl_ci95": {"in_domain": {"low": ppl - 0.5, "high": ppl + 0.5}},
        }
        (m / "arms" / f"{arm}.json").write_text(json.dumps(rec))
    rows = ap.doses(params, m)
    assert [(r["arm"], r["tokens"]) for r in rows] == [("d0", 0), ("d25k", 25600)]
    lines = ap.table(rows).splitlines()[2:]
    assert "| 900.00 |" in lines[0] and "| 300.00 |" in lines[1]
    assert "3.0000 [2.50–3.50]" in lines[1]
    assert ap.references(m) == {"original": 3.2}
    out = tmp_path / "a.png"
    assert ap.main(["--params", str(params), "--metrics", str(m), "--out", str(out)]) == 0
    assert [r["arm"] for r in ap.doses(params, m, ["d25k"])] == ["d25k"]  # --arms keeps a subset
    with pytest.raises(SystemExit, match="d9"):
        ap.doses(params, m, ["d9"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (m / "arms" / "d0.json").unlink()
    with pytest.raises(SystemExit, match="d0.json is missing"):
        ap.doses(params, m)
