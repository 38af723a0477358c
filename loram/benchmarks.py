"""Benchmark names, importable without the evaluator (the params schema validates against them)."""

from __future__ import annotations

CSR_TASKS: tuple[str, ...] = (
    "arc_challenge",
    "arc_easy",
    "hellaswag",
    "openbookqa",
    "piqa",
    "winogrande",
)
"""The six common-sense reasoning tasks of the paper (``csr`` in params)."""

BENCH_TASKS: tuple[str, ...] = ("gsm8k", "mathqa", "csr", *CSR_TASKS, "humaneval")
"""Names accepted by ``eval.tasks``, ``eval.limit`` and ``eval.num_fewshot``."""
