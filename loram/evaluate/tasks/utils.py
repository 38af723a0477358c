"""Document functions referenced (``!function utils.X``) by the local task YAMLs.

Each reimplements the stock lm-eval 0.4.13 behaviour named in its docstring; the tests
compare them with the stock functions on the same rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_BRACKETED = re.compile(r"\[.*?\]")


def hellaswag_clean(text: str) -> str:
    """Stock hellaswag text cleanup: strip, " [title]" -> ". ", drop [..] artifacts, squeeze."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """Stock hellaswag doc: query = "<activity>: <ctx_a> <Ctx_b>", cleaned endings, int gold."""
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": hellaswag_clean(doc["activity_label"] + ": " + context),
        "choices": [hellaswag_clean(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset):
    """``process_docs`` for hellaswag (a ``datasets.Dataset`` map, as stock)."""
    return dataset.map(hellaswag_doc)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """Gold option index (stock partial scoring: the *contexts* differ between options)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The shared continuation: the sentence after the blank."""
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """One context per option: the sentence up to the blank, with the option filled in."""
    blank = doc["sentence"].index("_")
    prefix = doc["sentence"][:blank]
    return [prefix + doc["option1"], prefix + doc["option2"]]


def humaneval_build_predictions(
    resps: Sequence[Sequence[str]], docs: Sequence[dict[str, Any]]
) -> list[list[str]]:
    """Stock ``create_test`` filter: each sampled completion appended to its prompt."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_process_results(
    doc: dict[str, Any],
    results: Sequence[Sequence[str]],
    *,
    ks: Sequence[int] = (1,),
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    sandbox: str = "strict",
) -> dict[str, float]:
    """pass@k for one problem: run every candidate (prompt+completion) + tests in the sandbox."""
    from loram.evaluate.humaneval import pass_at_k, run_candidates

    candidates = list(results[0])
    passed = run_candidates(
        candidates,
        doc["test"],
        doc["entry_point"],
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        workers=workers,
        policy=sandbox,
    )
    n, c = len(candidates), sum(passed)
    return {f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}


_MATHQA_OPTION = re.compile(r"[abcd] \) .*?, |e \) .*?$")


def mathqa_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """Stock mathqa choices: the five answers of "a ) x , b ) y , ... e ) z"."""
    return [c[4:].rstrip(" ,") for c in _MATHQA_OPTION.findall(doc["options"])]
