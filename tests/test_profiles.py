from pathlib import Path

import pytest
import yaml

from loram.config import ParamsError, parse_params
from loram.profiles import apply_profile, deep_merge

ROOT = Path(__file__).resolve().parents[1]


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": {"k": 1}}, "b": [1, 2], "c": 3}
    over = {"a": {"y": {"j": 2}}, "b": [9], "d": None}
    assert deep_merge(base, over) == {
        "a": {"x": 1, "y": {"k": 1, "j": 2}},
        "b": [9],
        "c": 3,
        "d": None,
    }
    assert base["a"]["y"] == {"k": 1}  # inputs untouched


@pytest.mark.parametrize("profiles", [["paper.yaml"], ["paper.yaml", "paper-70b.yaml"]])
def test_shipped_profiles_validate(tmp_path, profiles):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    for name in profiles:
        apply_profile(ROOT / "profiles" / name, params)
    p = parse_params(yaml.safe_load(params.read_text()))
    assert p["base"].dtype == "bfloat16" and p["eval"].limit == {}
    assert (
        p["align"].max_steps * p["align"].micro_batch * p["align"].grad_accum * p["align"].seq_len
        == 104_857_600
    )
    if "paper-70b.yaml" in profiles:
        assert p["train"].quantize == "nf4" and p["prune"].ratio == 0.85


def test_variants_profile_resolves_every_method(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_profile(ROOT / "profiles" / "variants.yaml", params)
    p = parse_params(yaml.safe_load(params.read_text()))
    assert {n: b["prune"].method for n, b in p["bases"].items()} == {
        "stru": "structured",
        "rand": "random",
        "semi": "semi",
        "unst": "unstructured",
    }
    arms = p["arms"]
    assert {n: a["spec"].base for n, a in arms.items()} == {
        "loram": "stru",
        "rand": "rand",
        "semi": "semi",
        "unst": "unst",
        "qloram": "stru",  # QLoRAM-Stru trains on LoRAM-Stru's aligned base
    }
    assert p["bases"]["unst"]["prune"].ratio == 0.55 and arms["qloram"]["train"].quantize == "nf4"


def test_bad_profile_is_rejected_before_writing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: {ratio: 1.2}\n")
    with pytest.raises(ParamsError, match="prune.ratio = 1.2"):
        apply_profile(bad, params)
    assert params.read_text() == before


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_shipped_profile_validates_on_params_yaml(tmp_path, profile):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_text()
    merged = apply_profile(ROOT / "profiles" / profile, params, write=False)
    assert params.read_text() == before
    parse_params(merged)


def test_partial_source_in_a_profile_keeps_the_listed_source_keys(tmp_path):
    """params.yaml lists every key of data.train; a profile naming a few of them merges in."""
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    merged = apply_profile(ROOT / "profiles" / "ci.yaml", params, write=False)
    train = parse_params(merged)["data"].train
    assert (train.name, train.max_rows, train.split, train.format) == ("math", 40, "train", "auto")
