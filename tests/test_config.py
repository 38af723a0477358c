from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from loram.config import (
    SECTIONS,
    ParamsError,
    SourceParams,
    TrainParams,
    load_params,
    parse_params,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


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
        ({"train": {"targets": ["q_proj", "bogus"]}}, "train.targets[1] = 'bogus'"),
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


# --------------------------------------------------------------------------------------------
# One source of defaults: params.yaml lists every key the code reads, with the code's defaults.


def test_params_yaml_top_level_keys_are_exactly_the_sections():
    assert list(RAW) == [*SECTIONS, "bases", "arms", "variants", "ablations"]
    assert RAW["variants"] == {}


def _compare(model: type[BaseModel], default: BaseModel, listed, where: str) -> list[str]:
    """Differences between a model's defaults and its block in params.yaml, recursively."""
    if not isinstance(listed, dict):
        return [f"{where} is not a mapping in params.yaml"]
    problems = [
        f"{where}.{k} is in params.yaml but not in {model.__name__}"
        for k in listed
        if k not in model.model_fields
    ]
    for name in model.model_fields:
        value = getattr(default, name)
        if name not in listed:
            problems.append(f"{where}.{name} (default {value!r}) is missing from params.yaml")
        elif isinstance(value, BaseModel):
            problems += _compare(type(value), value, listed[name], f"{where}.{name}")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            # a list of sources: each item lists only what differs from SourceParams' defaults
            filled = [type(value[0]).model_validate(item) for item in listed[name]]
            if filled != value:
                problems.append(f"{where}.{name}: code default {value!r} != params.yaml {filled!r}")
        elif value != listed[name] or isinstance(value, bool) != isinstance(listed[name], bool):
            problems.append(
                f"{where}.{name}: code default {value!r} != params.yaml {listed[name]!r}"
            )
    return problems


@pytest.mark.parametrize("section", list(SECTIONS))
def test_code_defaults_equal_params_yaml(section):
    cls = SECTIONS[section]
    default = cls()  # every field has a default
    assert _compare(cls, default, RAW[section], section) == []
    assert parse_params(RAW, [section])[section] == default
    assert load_params(ROOT / "params.yaml")[section] == default


def test_source_defaults_are_data_train_and_every_source_key_is_listed():
    assert to_dict(SourceParams()) == RAW["data"]["train"]
    assert set(RAW["data"]["align"]) == set(SourceParams.model_fields)


def test_every_field_is_described_or_self_explanatory():
    """Field docs live in the schema (``Field(description=...)``), e.g. for ``--help`` or docs."""
    schema = TrainParams.model_json_schema()["properties"]
    assert "the rest is for the evaluate stage" in schema["max_val_rows"]["description"]
    assert schema["quantize"]["enum"] == ["none", "nf4"]


# --------------------------------------------------------------------------------------------
# One schema: exact one-line messages naming the dotted key, the bad value and what is allowed.

TASKS = (
    "'gsm8k', 'mathqa', 'csr', 'arc_challenge', 'arc_easy', 'hellaswag', 'openbookqa', "
    "'piqa', 'winogrande', 'humaneval'"
)
TARGETS = "'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'"


@pytest.mark.parametrize(
    "raw, message",
    [
        # unknown keys and sections
        (
            {"train": {"lrr": 1e-3}},
            "train.lrr is not a known parameter; allowed keys in 'train': alpha, "
            "attn_implementation, block_cache, dropout, dropout_rng, eval_every, grad_accum, grad_checkpointing, heap_mmap_threshold, "
            "keep_checkpoint, lm_head, loss_chunk, loss_fused, lr, max_grad_norm, max_steps, "
            "max_val_rows, micro_batch, optimizer, packing, precision, processes, quantize, r, save_every, "
            "schedule, seed, seq_len, sharding, targets, warmup_steps, weight_decay",
        ),
        (
            {"data": {"ood": [{}, {"kidn": "hub"}]}},
            "data.ood[1].kidn is not a known parameter; allowed keys in 'data.ood[1]': "
            "format, kind, max_rows, name, split, subset",
        ),
        (
            {"prun": {"ratio": 0.3}},
            "prun is not a known params section; allowed: "
            "base, data, prune, align, train, recover, merge, eval, baselines, bases, arms, variants, ablations",
        ),
        # wrong types: bools are not numbers, strings are not coerced, null only where optional
        ({"train": {"lr": "1e-3"}}, "train.lr = '1e-3' is not allowed: expected a number"),
        ({"train": {"r": True}}, "train.r = True is not allowed: expected an integer"),
        ({"train": {"r": 8.0}}, "train.r = 8.0 is not allowed: expected an integer"),
        ({"train": {"alpha": False}}, "train.alpha = False is not allowed: expected a number"),
        ({"train": {"r": None}}, "train.r = None is not allowed: expected an integer"),
        (
            {"base": {"revision": 1234}},
            "base.revision = 1234 is not allowed: expected a string or null",
        ),
        (
            {"eval": {"max_gen_toks": "x"}},
            "eval.max_gen_toks = 'x' is not allowed: expected an integer or null",
        ),
        ({"recover": {"norm_a": 1}}, "recover.norm_a = 1 is not allowed: expected true or false"),
        ({"prune": [0.5]}, "prune = [0.5] is not allowed: expected a mapping of parameters"),
        (
            {"data": {"train": "mbpp"}},
            "data.train = 'mbpp' is not allowed: expected a mapping of parameters",
        ),
        ({"eval": {"limit": [5]}}, "eval.limit = [5] is not allowed: expected a mapping"),
        (
            {"train": {"targets": "q_proj"}},
            f"train.targets = 'q_proj' is not allowed: expected a list from {TARGETS}",
        ),
        # out of range / not one of the choices
        ({"train": {"lr": -1}}, "train.lr = -1 is not allowed: expected a value > 0"),
        (
            {"train": {"lr": float("nan")}},
            "train.lr = nan is not allowed: expected a finite number",
        ),
        (
            {"train": {"dropout": 1}},
            "train.dropout = 1 is not allowed: expected a value >= 0 and < 1",
        ),
        (
            {"align": {"max_steps": -1}},
            "align.max_steps = -1 is not allowed: expected a value >= 0",
        ),
        ({"align": {"seq_len": 4}}, "align.seq_len = 4 is not allowed: expected a value >= 8"),
        (
            {"eval": {"humaneval_top_p": 1.5}},
            "eval.humaneval_top_p = 1.5 is not allowed: expected a value > 0 and <= 1",
        ),
        (
            {"data": {"train": {"max_rows": 0}}},
            "data.train.max_rows = 0 is not allowed: expected a value >= 1",
        ),
        (
            {"prune": {"method": "foo"}},
            "prune.method = 'foo' is not allowed: expected one of "
            "'structured', 'random', 'semi', 'unstructured'",
        ),
        (
            {"data": {"ood": [{"kind": "hub", "name": "x"}, {"kind": "ftp"}]}},
            "data.ood[1].kind = 'ftp' is not allowed: expected one of 'embedded', 'hub', 'file'",
        ),
        (
            {"merge": {"target": "sparse"}},
            "merge.target = 'sparse' is not allowed: expected one of 'original', 'pruned'",
        ),
        (
            {"train": {"targets": ["q_proj", "bogus"]}},
            f"train.targets[1] = 'bogus' is not allowed: expected one of {TARGETS}",
        ),
        (
            {"train": {"targets": []}},
            f"train.targets = [] is not allowed: expected a non-empty list from {TARGETS}",
        ),
        (
            {"eval": {"tasks": ["gsm8k", "mmlu"]}},
            f"eval.tasks[1] = 'mmlu' is not allowed: expected one of {TASKS}",
        ),
        (
            {"eval": {"limit": {"mmlu": 5}}},
            f"eval.limit key = 'mmlu' is not allowed: expected one of {TASKS}",
        ),
        (
            {"eval": {"limit": {"gsm8k": 0}}},
            "eval.limit.gsm8k = 0 is not allowed: expected a value >= 1",
        ),
        # cross-field checks
        ({"prune": {"n": 5, "m": 4}}, "prune.n = 5 is not allowed: expected a value >= 1 and <= 4"),
        (
            {"prune": {"method": "random", "criterion": "wanda"}},
            "prune.criterion = 'wanda' is not allowed: expected taylor or magnitude for method random",
        ),
        (
            {"base": {"model": " "}},
            "base.model = ' ' is not allowed: expected a model name, hub id, directory or .gguf file",
        ),
        # variants: the spec, then each override resolved against the shared sections
        (
            {"variants": {"rand": {"prune": {"method": "random", "ratio": 1.2}}}},
            "variants.rand.prune.ratio = 1.2 is not allowed: expected a value >= 0 and < 1",
        ),
        (
            {"variants": {"rand": {"prune": {"ratoi": 0.5}}}},
            "variants.rand.prune.ratoi is not a known parameter; allowed keys in "
            "'variants.rand.prune': calib_samples, calib_seq_len, criterion, first_layer, "
            "last_dense, m, method, n, ratio, round_to, seed",
        ),
        (
            {"variants": {"rand": {"prnue": {"method": "random"}}}},
            "variants.rand.prnue is not a known parameter; allowed keys in 'variants.rand': "
            "align, base, description, kind, merge, prune, recover, train",
        ),
        (
            {"variants": {"rand": {"prune": "random"}}},
            "variants.rand.prune = 'random' is not allowed: expected a mapping",
        ),
        (
            {"variants": ["rand"]},
            "variants = ['rand'] is not allowed: expected a mapping of variant name -> overrides",
        ),
    ],
)
def test_bad_params_exact_one_line_message(raw, message):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert str(err.value) == message


def test_several_errors_one_line_each_unknown_keys_first():
    with pytest.raises(ParamsError) as err:
        parse_params({"prune": {"ratio": 2, "n": "x", "ratoi": 1}})
    lines = str(err.value).splitlines()
    assert lines[0].startswith("prune.ratoi is not a known parameter;")
    assert lines[1:] == [
        "prune.ratio = 2 is not allowed: expected a value >= 0 and < 1",
        "prune.n = 'x' is not allowed: expected an integer",
    ]


def test_types_kept_null_sections_default_and_keyword_construction():
    p = parse_params(
        {"train": {"alpha": 32, "lr": 1}, "merge": None, "eval": {"max_gen_toks": None}}
    )
    assert p["train"].alpha == 32.0 and isinstance(p["train"].alpha, float)
    assert isinstance(p["train"].lr, float)
    assert p["merge"] == SECTIONS["merge"]() and p["eval"].max_gen_toks is None
    t = TrainParams(r=4, alpha=8, dropout=0.1)
    assert (t.r, t.alpha, t.lr) == (4, 8.0, 3e-4)
    with pytest.raises(ValueError):
        TrainParams(r=0)
    assert issubclass(ParamsError, ValueError)


def test_to_dict_round_trips_through_the_schema():
    p = parse_params(RAW)
    for name, cls in SECTIONS.items():
        d = to_dict(p[name])
        assert isinstance(d, dict) and cls.model_validate(d) == p[name]
    assert isinstance(to_dict(p["data"])["ood"][0], dict)


# ------------------------------------------------------------------ named bases and arms


def _named_raw():
    return {
        "prune": {"ratio": 0.5},
        "train": {"lr": 1e-3},
        "bases": {"stru": {}, "rand": {"prune": {"method": "random"}}},
        "arms": {
            "loram": {"base": "stru"},
            "fast": {"base": "stru", "train": {"lr": 2e-3}},
            "r": {"base": "rand", "description": "LoRAM-Rand"},
        },
    }


def test_named_entries_override_only_their_sections():
    from loram.config import resolve_named

    raw = _named_raw()
    rand = resolve_named(raw, "bases", "rand")
    assert rand["prune"].method == "random" and rand["prune"].ratio == 0.5
    assert resolve_named(raw, "bases", "stru")["prune"].method == "structured"
    fast = resolve_named(raw, "arms", "fast")
    assert fast["train"].lr == 2e-3 and fast["spec"].base == "stru"
    assert resolve_named(raw, "arms", "loram")["train"].lr == 1e-3
    p = parse_params(raw)
    assert set(p["bases"]) == {"stru", "rand"} and set(p["arms"]) == {"loram", "fast", "r"}


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"arms": {"x": {"base": "nope"}}}, "arms.x.base = 'nope' is not allowed"),
        ({"arms": {"x": {}}}, "arms.x.base"),
        ({"arms": {"x": {"base": "stru", "prune": {}}}}, "arms.x.prune is not a known parameter"),
        ({"bases": {"x": {"prune": {"ratio": 2}}}}, "bases.x.prune.ratio = 2 is not allowed"),
        ({"bases": {"x": {"train": {}}}}, "bases.x.train is not a known parameter"),
        ({"bases": {"a b": {}}}, "bases name = 'a b' is not allowed"),
        ({"arms": ["x"]}, "arms = ['x'] is not allowed"),
        ({"variants": {"v": {"kind": "loram"}}}, "variants.v.kind = 'loram' is not allowed"),
    ],
)
def test_named_entry_errors(patch, message):
    raw = {
        **_named_raw(),
        **{
            k: {**(_named_raw().get(k) or {}), **v} if isinstance(v, dict) else v
            for k, v in patch.items()
        },
    }
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    assert message in str(exc.value), str(exc.value)


def test_load_named_for_a_stage(tmp_path):
    import yaml

    from loram.config import load_named

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(_named_raw(), sort_keys=False))
    got = load_named(f, "arms", "fast", ("train",))
    assert got["train"].lr == 2e-3 and got["spec"].base == "stru" and set(got) == {"train", "spec"}
    with pytest.raises(
        ParamsError, match="arms.zzz is not in the params file; defined: loram, fast, r"
    ):
        load_named(f, "arms", "zzz", ("train",))


def _ablations_raw(**ablations) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(RAW))
    raw["ablations"] = ablations
    return raw


def test_shipped_ablations_name_an_existing_base_and_arm():
    ab = parse_params(RAW)["ablations"]
    assert ab.noalign["loram_noalign"].base == "stru"
    rec = ab.no_recovery["no_recovery"]
    assert (rec.arm, rec.base) == ("loram", RAW["arms"]["loram"]["base"])
    assert parse_params(_ablations_raw(noalign={}, no_recovery={}))["ablations"].noalign == {}
    assert parse_params(_ablations_raw())["ablations"].no_recovery == {}


@pytest.mark.parametrize(
    "ablations,message",
    [
        ({"noalign": {"x": {"base": "nope", "description": "d"}}},
         "ablations.noalign.x.base = 'nope' is not allowed: expected the name of an entry of bases: stru"),
        ({"noalign": {"x": {"base": "stru"}}}, "ablations.noalign.x.description"),
        ({"no_recovery": {"x": {"arm": "nope", "base": "stru", "description": "d"}}},
         "ablations.no_recovery.x.arm = 'nope' is not allowed"),
        ({"no_recovery": {"x": {"arm": "loram", "base": "other", "description": "d"}}},
         "ablations.no_recovery.x.base = 'other' is not allowed: expected the base of arms.loram: stru"),
        ({"noalign": {"loram": {"base": "stru", "description": "d"}}},
         "ablations.noalign = 'loram' is not allowed: expected a name no arm"),
        ({"noalign": {"a": {"base": "stru", "description": "d"}},
          "no_recovery": {"a": {"arm": "loram", "base": "stru", "description": "d"}}},
         "ablations.no_recovery = 'a' is not allowed"),
        ({"noalign": {"a b": {"base": "stru", "description": "d"}}},
         "ablations.noalign.a b name = 'a b' is not allowed"),
        ({"other": {}}, "ablations.other is not a known parameter"),
    ],
)  # fmt: skip
def test_ablation_errors_name_the_entry_and_what_is_allowed(ablations, message):
    with pytest.raises(ParamsError) as exc:
        parse_params(_ablations_raw(**ablations))
    assert message in str(exc.value), str(exc.value)


def test_evaluate_tasks_option_replaces_eval_tasks_and_is_validated():
    from loram.config import EvalParams
    from loram.pipeline.evaluate import _with_tasks

    p = EvalParams()
    assert _with_tasks(p, "none").tasks == []
    assert _with_tasks(p, "csr, gsm8k").tasks == ["csr", "gsm8k"]
    assert _with_tasks(p, "none").limit == p.limit
    with pytest.raises(ParamsError, match="--tasks"):
        _with_tasks(p, "bogus")
