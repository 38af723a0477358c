import pytest
import yaml

from loram.config import ParamsError, load_params, parse_params


def test_shipped_params_parse():
    params = load_params("params.yaml")
    assert params["prune"].method in ("structured", "random", "semi", "unstructured")
    assert 0 <= params["prune"].ratio < 1
    assert params["data"].train.kind == "embedded"


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"prune": {"ratio": 1.5}}, "prune.ratio = 1.5"),
        ({"prune": {"ratio": -0.1}}, "prune.ratio = -0.1"),
        ({"prune": {"method": "magic"}}, "one of 'structured', 'random', 'semi', 'unstructured'"),
        ({"prune": {"ratoi": 0.5}}, "prune.ratoi is not a known parameter"),
        ({"train": {"r": "eight"}}, "train.r = 'eight'"),
        ({"train": {"r": 0}}, "train.r = 0"),
        ({"train": {"lr": True}}, "train.lr = True"),
        ({"train": {"targets": ["q_proj", "bogus"]}}, "train.targets"),
        ({"train": {"quantize": "int3"}}, "'none', 'nf4'"),
        (
            {"align": {"enabled": "yes"}},
            "align.enabled = 'yes' is not allowed: expected true or false",
        ),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction = 1.0"),
        ({"data": {"train": {"kind": "ftp"}}}, "data.train.kind = 'ftp'"),
        ({"prune": {"method": "semi", "criterion": "taylor"}}, "prune.criterion = 'taylor'"),
        ({"prune": {"n": 5, "m": 4}}, "prune.n = 5"),
        ({"prune": {"calib_samples": 0}}, "prune.calib_samples = 0"),
        ({"prune": {"first_layer": -1}}, "prune.first_layer = -1"),
        ({"nonsense": {}}, "nonsense is not a known params section"),
    ],
)
def test_bad_params_name_key_value_and_allowed(raw, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert needle in str(err.value)


def test_ints_widen_to_floats_and_defaults_fill_in():
    p = parse_params({"prune": {"ratio": 0}, "train": {"alpha": 32}})
    assert p["prune"].ratio == 0.0 and isinstance(p["prune"].ratio, float)
    assert p["train"].alpha == 32.0 and p["train"].r == 8


def test_missing_and_corrupt_params_file(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="mapping"):
        load_params(lst)


def test_cli_reports_bad_params(tmp_path, capsys):
    from loram.cli import main

    f = tmp_path / "p.yaml"
    f.write_text("prune: {ratio: 2}\n")
    rc = main(["prune", "--params", str(f)])
    assert rc == 2
    assert "prune.ratio = 2" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    from loram.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("base", "data", "prune", "align", "train", "recover", "merge", "evaluate"):
        assert cmd in out


def test_variants_override_shared_sections_and_validate():
    raw = {
        "prune": {"ratio": 0.5},
        "variants": {
            "rand": {"prune": {"method": "random"}},
            "qloram": {"train": {"quantize": "nf4"}, "description": "QLoRAM"},
        },
    }
    p = parse_params(raw)
    assert p["variants"]["rand"]["prune"].method == "random"
    assert p["variants"]["rand"]["prune"].ratio == 0.5  # inherited
    assert p["variants"]["qloram"]["train"].quantize == "nf4"
    assert p["variants"]["qloram"]["prune"].method == "structured"
    with pytest.raises(ParamsError, match=r"variants.bad.prune.ratio = 3"):
        parse_params({"variants": {"bad": {"prune": {"ratio": 3}}}})
    with pytest.raises(ParamsError, match=r"variants.bad.kind"):
        parse_params({"variants": {"bad": {"kind": "full"}}})


@pytest.mark.parametrize(
    "method, criterion, used",
    [
        ("structured", "auto", "taylor"),
        ("random", "auto", "random"),
        ("semi", "auto", "wanda"),
        ("unstructured", "sparsegpt", "sparsegpt"),
        ("structured", "magnitude", "magnitude"),
    ],
)
def test_auto_criterion_resolves_per_method(method, criterion, used):
    p = parse_params({"prune": {"method": method, "criterion": criterion}})["prune"]
    assert p.resolved_criterion == used
