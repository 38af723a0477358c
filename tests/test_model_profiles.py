"""profiles/headline.yaml and profiles/alignment.yaml: valid, and they say what the README says."""

from __future__ import annotations

from pathlib import Path

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
    assert p["base"].model == "qwen2.5-coder-1.5b" and p["base"].dtype == "float32"
    v = p["variants"]
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
