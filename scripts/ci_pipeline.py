#!/usr/bin/env python
"""CI: run the whole DVC pipeline on the tiny profile in a throw-away copy and diff its metrics.

Steps: copy the tracked files to a temporary directory; deep-merge ``profiles/ci.yaml`` into
its ``params.yaml`` (``loram profile``; the profile's ``variants`` replace the params' ones);
commit the baseline metrics of ``ci/metrics/`` (a mirror of the metric paths, e.g.
``ci/metrics/metrics/base.json``) in a fresh git repository there; ``dvc repro``; print ``dvc metrics diff`` against that commit; fail if a baseline metric is missing or is no
longer a number (numeric changes, e.g. timings, are fine) or if any non-numeric key (a string
or boolean label) differs from the baseline's (``check_non_numeric``); check that editing ``train.lr`` or
``prune.ratio`` invalidates exactly the stages that should re-run.

``--update-baseline`` rewrites ``ci/metrics/`` from the run. Exit status 0 on success.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = Path("profiles/ci.yaml")
DEFAULT_BASELINE = Path("ci/metrics")
GENERATED = ("dvc.lock", "metrics", "plots", "reports", "artifacts")
"""Pipeline outputs that the copy must not inherit from the working tree (``.gitignore`` kept)."""
UPSTREAM_ONLY = {"base", "data"}
"""Stages that no parameter edit of the cache check may invalidate."""
VALIDATOR = "params"
"""The stage that validates the whole params.yaml: it re-runs on any edit, but its output is the
same for every valid file, so the stages after it do not re-run because of it."""


class CIError(RuntimeError):
    """A CI step failed; the message says which and why."""


# ------------------------------------------------------------------------------- small helpers


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts / lists as ``{"a.b[0].c": value}`` (empty containers are leaves)."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, list) and obj:
        out = {}
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def is_number(value: Any) -> bool:
    """A finite int or float (booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_metrics(baseline: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Problems of ``current`` against ``baseline`` (both: metric file path -> parsed JSON).

    Every numeric leaf of the baseline must exist in the current run and still be a finite
    number; its value may change. A baseline file missing from the run is a problem too.
    New files and keys, and non-numeric baseline leaves (strings, nulls), are not checked.
    """
    problems = []
    for path in sorted(baseline):
        if path not in current:
            problems.append(f"{path}: metric file is missing from the run")
            continue
        new = flatten(current[path])
        for key, old in flatten(baseline[path]).items():
            if not is_number(old):
                continue
            if key not in new:
                problems.append(f"{path}: metric {key!r} is missing (baseline {old!r})")
            elif not is_number(new[key]):
                problems.append(
                    f"{path}: metric {key!r} is not numeric: {new[key]!r} (baseline {old!r})"
                )
    return problems


def _is_label(value: Any) -> bool:
    """A non-numeric metric leaf that must not change between runs (a string or a boolean);
    nulls are missing numbers, not labels."""
    return isinstance(value, str | bool)


def check_non_numeric(baseline: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Non-numeric keys that differ between the run and the baseline (files in both).

    Metrics files should hold numbers that ``dvc metrics diff`` compares; the only strings and
    booleans allowed are fixed labels (arm, kind, method, ...), equal on every machine. A label
    whose value differs, one that appears only in the run (e.g. a machine path or provenance
    that belongs in a non-metric file) or only in the baseline is a problem.
    """
    problems = []
    for path in sorted(set(baseline) & set(current)):
        old, new = flatten(baseline[path]), flatten(current[path])
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
            if not (_is_label(a) or _is_label(b)) or a == b:
                continue
            if a is _ABSENT:
                problems.append(f"{path}: non-numeric key {key!r} = {b!r} is not in the baseline")
            elif b is _ABSENT:
                problems.append(f"{path}: non-numeric key {key!r} (baseline {a!r}) is missing")
            else:
                problems.append(f"{path}: non-numeric key {key!r} changed: {a!r} -> {b!r}")
    return problems


_ABSENT = object()


def read_metric_tree(folder: Path) -> dict[str, Any]:
    """Every ``*.json`` under ``folder`` as relative POSIX path -> parsed JSON."""
    out = {}
    for f in sorted(folder.rglob("*.json")):
        out[f.relative_to(folder).as_posix()] = json.loads(f.read_text())
    return out


class Clock:
    """Prints progress lines with the time since the start and per step."""

    def __init__(self, out: Callable[[str], None] | None = None) -> None:
        self.t0 = time.monotonic()
        self.steps: list[tuple[str, float]] = []
        self.out = out or (lambda s: print(s, flush=True))

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        self.out(f"[ci {start - self.t0:6.1f}s] {name} ...")
        result = fn()
        took = time.monotonic() - start
        self.steps.append((name, took))
        self.out(f"[ci {time.monotonic() - self.t0:6.1f}s] {name}: done in {took:.1f}s")
        return result

    def total(self) -> float:
        return time.monotonic() - self.t0


# ------------------------------------------------------------------------------- the copy


def tool_env() -> dict[str, str]:
    """Environment for dvc and the stages: this Python's bin first, the copy's package, offline."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # the tiny model is faster on one thread
    env.pop("PYTHONPATH", None)
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)
    env.pop("GIT_INDEX_FILE", None)
    return env


def find_tools() -> dict[str, str]:
    """Absolute paths of ``git`` and ``dvc`` (also looked up beside this Python); CIError if absent."""
    path = tool_env()["PATH"]
    tools = {name: shutil.which(name, path=path) for name in ("git", "dvc")}
    missing = [name for name, exe in tools.items() if exe is None]
    if missing:
        raise CIError(f"{' and '.join(missing)} not found on PATH")
    return {k: str(v) for k, v in tools.items()}


def sh(cmd: list[str], cwd: Path, env: Mapping[str, str], what: str, tail: int = 60) -> str:
    """Run ``cmd``; return its stdout; CIError with the output's last lines if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).rstrip().splitlines()[-tail:]
        raise CIError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(lines)
        )
    return proc.stdout


def stream(
    cmd: list[str], cwd: Path, env: Mapping[str, str], log: Path, say: Callable[[str], None]
) -> dict[str, float]:
    """Run ``cmd`` (``dvc repro``) with its output in ``log``; print each stage as it ends.

    Returns stage name -> seconds; CIError with the log's last lines if the command fails.
    """
    times: dict[str, float] = {}
    t0 = time.monotonic()
    current, started = None, t0

    def finish(now: float) -> None:
        if current is not None:
            times[current] = now - started
            say(f"  stage {current}: {times[current]:.1f}s")

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            m = re.match(r"(?:Running stage|Stage) '([^']+)'", line)
            if m:
                now = time.monotonic()
                finish(now)
                current, started = (m.group(1), now) if line.startswith("Running") else (None, now)
                if line.startswith("Stage"):  # "Stage 'x' didn't change, skipping"
                    say(f"  stage {m.group(1)}: unchanged, skipped")
        rc = proc.wait()
    if rc == 0:
        finish(time.monotonic())
    else:
        lines = log.read_text().rstrip().splitlines()[-80:]
        raise CIError(
            f"{' '.join(cmd)} failed (exit {rc}); log {log}, last lines:\n" + "\n".join(lines)
        )
    return times


def tracked_files(root: Path, env: Mapping[str, str]) -> list[str]:
    """Paths git tracks, or would track (new files not ignored), under ``root`` that exist in
    the working tree (working-tree contents)."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    out = sh(cmd, root, env, "git ls-files")
    return [p for p in out.split("\0") if p and (root / p).is_file()]


def copy_project(root: Path, work: Path, env: Mapping[str, str]) -> int:
    """Copy the tracked files into ``work``, leaving out generated pipeline outputs."""
    n = 0
    for rel in tracked_files(root, env):
        top = rel.split("/", 1)[0]
        if top in GENERATED and not rel.endswith(".gitignore"):
            continue
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest)
        n += 1
    return n


def apply_profile(work: Path, profile: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Merge the profile into ``work/params.yaml`` with the copy's own ``loram profile`` command.

    ``loram profile`` deep-merges (mappings key by key, the rest replaces) and validates. The
    profile's ``variants`` then replace those of params.yaml, so the CI runs exactly its own arms.
    Returns the resulting parameters.
    """
    over = yaml.safe_load(profile.read_text()) or {}
    if not isinstance(over, dict):
        raise CIError(f"{profile} must be a mapping of params sections")
    cmd = [sys.executable, "-m", "loram.cli", "profile", str(profile), "--params", "params.yaml"]
    sh(cmd, work, dict(env, PYTHONPATH=str(work)), "loram profile")
    params = work / "params.yaml"
    merged = yaml.safe_load(params.read_text())
    if "variants" in over and merged.get("variants") != over["variants"]:
        merged["variants"] = over["variants"]
        params.write_text(yaml.safe_dump(merged, sort_keys=False))
    return merged


def validate_params(work: Path, env: Mapping[str, str]) -> None:
    """Parse the merged params with the copy's own ``loram.config`` (clear errors early)."""
    code = "from loram.config import load_params; load_params('params.yaml')"
    sh([sys.executable, "-c", code], work, dict(env, PYTHONPATH=str(work)), "params check")


def init_repo(work: Path, baseline: Path, env: Mapping[str, str]) -> int:
    """A fresh git repo in ``work`` whose single commit holds the baseline metrics."""
    n = 0
    if baseline.is_dir():
        for f in sorted(baseline.rglob("*")):
            if f.is_file():
                dest = work / f.relative_to(baseline)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
                n += 1
    git = ["git", "-c", "user.name=loram-ci", "-c", "user.email=ci@loram.invalid"]
    sh(["git", "init", "-q"], work, env, "git init")
    sh(
        ["dvc", "config", "--local", "core.site_cache_dir", str(work / ".dvc" / "tmp" / "site")],
        work,
        env,
        "dvc config",
    )
    sh(["git", "add", "-A"], work, env, "git add")
    sh([*git, "commit", "-q", "--no-verify", "-m", "CI baseline"], work, env, "git commit")
    return n


# ------------------------------------------------------------------------------- dvc


def metric_paths(work: Path, env: Mapping[str, str]) -> list[str]:
    """The metric files of the run (``dvc metrics show``; directories expanded to their files)."""
    out = json.loads(sh(["dvc", "metrics", "show", "--json"], work, env, "dvc metrics show"))
    files: set[str] = set()
    for rev in out.values():
        for path in rev.get("data") or {}:
            files.add(Path(path).as_posix())
    expanded = set()
    for rel in files:
        p = work / rel
        if p.is_dir():
            expanded.update(f.relative_to(work).as_posix() for f in p.rglob("*.json"))
        elif p.is_file():
            expanded.add(rel)
    return sorted(expanded)


def stage_graph(work: Path, env: Mapping[str, str]) -> dict[str, set[str]]:
    """Stage name -> the stages that depend on it directly (from ``dvc dag --dot``)."""
    dot = sh(["dvc", "dag", "--dot"], work, env, "dvc dag")
    down: dict[str, set[str]] = {}
    for line in dot.splitlines():
        m = re.match(r'\s*"?([^"\s]+)"?\s*->\s*"?([^"\s;]+)"?', line)
        if m:
            down.setdefault(m.group(1), set()).add(m.group(2))
            down.setdefault(m.group(2), set())
        else:
            m = re.match(r'\s*"?([^"\s\[\]{}]+)"?\s*;?\s*$', line)
            if m and m.group(1) not in ("strict", "digraph", "}", "{"):
                down.setdefault(m.group(1), set())
    return down


def downstream(graph: Mapping[str, set[str]], start: Iterable[str]) -> set[str]:
    """``start`` and every stage that (transitively) depends on one of them."""
    seen, todo = set(), list(start)
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(graph.get(s, ()))
    return seen


def changed_stages(work: Path, env: Mapping[str, str]) -> set[str]:
    """Stages ``dvc status`` reports as changed (their own deps, params or outs)."""
    out = sh(["dvc", "status", "--json"], work, env, "dvc status").strip()
    return set(json.loads(out or "{}"))


def set_param(params: Path, dotted: str, value: Any) -> None:
    """Set ``section.key`` in a params file (as ``dvc exp run -S section.key=value`` would)."""
    raw = yaml.safe_load(params.read_text())
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def check_caching(work: Path, env: Mapping[str, str], say: Callable[[str], None]) -> list[str]:
    """After a full repro: nothing is stale; a param edit invalidates its stage and what follows.

    ``dvc status`` reports the stages whose own inputs changed; the stages that would re-run
    are those plus everything downstream of them in ``dvc dag``.
    """
    problems = []
    stale = changed_stages(work, env)
    if stale:
        problems.append(
            f"right after `dvc repro`, dvc status still reports changed stages: {sorted(stale)}"
        )
    graph = stage_graph(work, env)
    params = work / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    cases = [
        ("train.lr", raw["train"]["lr"] * 2, "train", UPSTREAM_ONLY | {"prune", "align"}),
        ("prune.ratio", round(raw["prune"]["ratio"] / 2, 4), "prune", UPSTREAM_ONLY),
    ]

    def family(stages: Iterable[str]) -> set[str]:  # train@loram -> train
        return {s.split("@")[0] for s in stages}

    try:
        for key, value, must, untouched in cases:
            set_param(params, key, value)
            changed = changed_stages(work, env)
            if VALIDATOR not in changed:
                problems.append(f"editing {key} does not re-validate params.yaml")
            rerun = downstream(graph, changed - {VALIDATOR}) | (changed & {VALIDATOR})
            say(f"  -S {key}={value}: changed {sorted(changed)}; would re-run {len(rerun)} stages")
            if must not in family(changed):
                problems.append(
                    f"editing {key} does not invalidate stage {must!r} (changed: {sorted(changed)})"
                )
            need = downstream(graph, [s for s in graph if s.split("@")[0] == must])
            if not need <= rerun:
                problems.append(f"editing {key} would not re-run {sorted(need - rerun)}")
            wrong = {s for s in rerun if s.split("@")[0] in untouched}
            if wrong:
                problems.append(
                    f"editing {key} would re-run {sorted(wrong)}, which do not depend on it"
                )
            params.write_text(original)
        problems += _check_new_arm(work, env, params, original, say)
        # Editing one library file marks exactly the stages whose code imports it.
        problems += _check_code_edit(work, env, "loram/recover.py", say)
        # A misspelled section must stop `dvc repro` with a message naming it.
        params.write_text(original + "\nprun: {ratio: 0.3}\n")
        proc = subprocess.run(
            ["dvc", "repro", VALIDATOR], cwd=work, env=env, capture_output=True, text=True
        )
        say(f"  misspelled section 'prun': dvc repro exit {proc.returncode}")
        if proc.returncode == 0 or "prun" not in proc.stdout + proc.stderr:
            problems.append(
                "a misspelled params section 'prun' did not stop `dvc repro` with a message "
                f"naming it (exit {proc.returncode})"
            )
    finally:
        params.write_text(original)
    stale = changed_stages(work, env)
    if stale:
        problems.append(
            f"after restoring params.yaml, dvc status reports changed stages: {sorted(stale)}"
        )
    return problems


def _check_new_arm(
    work: Path, env: Mapping[str, str], params: Path, original: str, say: Callable[[str], None]
) -> list[str]:
    """Adding a fine-tune of an existing base re-runs only its own train -> evaluate chain."""
    raw = yaml.safe_load(original)
    base = next(iter(raw["bases"]))
    raw["arms"]["ci_new"] = {"base": base, "train": {"lr": raw["train"]["lr"] * 3}}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        changed = changed_stages(work, env)
        rerun = downstream(stage_graph(work, env), changed - {VALIDATOR})
    finally:
        params.write_text(original)
    want = {f"{s}@ci_new" for s in ("train", "recover", "merge", "evaluate_arm")} | {"report"}
    say(f"  new arm ci_new on base {base}: changed {sorted(changed)}; would re-run {sorted(rerun)}")
    if rerun != want:
        return [f"adding an arm would re-run {sorted(rerun)}, expected exactly {sorted(want)}"]
    return []


def _check_code_edit(
    work: Path, env: Mapping[str, str], rel: str, say: Callable[[str], None]
) -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_stage_deps", work / "scripts" / "stage_deps.py")
    sd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd)
    present = {s.split("@")[0] for s in stage_graph(work, env)}  # a foreach over {} has none
    want = {name for name, code in sd.stage_code(work).items() if rel in code} & present
    path = work / rel
    original = path.read_text()
    try:
        path.write_text(original + "\n# edited by the CI cache check\n")
        got = {s.split("@")[0] for s in changed_stages(work, env)}
    finally:
        path.write_text(original)
    say(f"  edit {rel}: changed stages {sorted(got)}")
    if got != want:
        return [
            f"editing {rel} marks stages {sorted(got)}, but the stages importing it are {sorted(want)}"
        ]
    return []


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--profile",
        type=Path,
        default=DEFAULT_PROFILE,
        help="params override (default: %(default)s)",
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=DEFAULT_BASELINE,
        help="baseline metrics (default: %(default)s)",
    )
    ap.add_argument(
        "--update-baseline", action="store_true", help="rewrite the baseline from this run"
    )
    ap.add_argument("--work", type=Path, help="work in this (new or empty) directory and keep it")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument(
        "--skip-cache-check", action="store_true", help="skip the parameter-edit cache check"
    )
    ap.add_argument("--all", action="store_true", help="list unchanged metrics in the diff too")
    ap.add_argument("--md", action="store_true", help="print the metrics diff as a Markdown table")
    return ap.parse_args(argv)


def run_ci(args: argparse.Namespace, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole CI run; returns a summary (``ok``, ``problems``, ``diff``, timings). Raises CIError."""
    say = say or (lambda s: print(s, flush=True))
    clock = Clock(say)
    env = tool_env()
    find_tools()
    profile = args.profile if args.profile.is_absolute() else ROOT / args.profile
    baseline = args.baseline if args.baseline.is_absolute() else ROOT / args.baseline
    keep = args.keep or args.work is not None
    if args.work is not None:
        work = args.work.resolve()
        if work.exists() and any(work.iterdir()):
            raise CIError(f"--work {work} exists and is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="loram-ci-"))
    run_env = dict(env, PYTHONPATH=str(work))
    summary: dict[str, Any] = {"work": str(work), "problems": []}
    try:
        n = clock.step("copy tracked files", lambda: copy_project(ROOT, work, env))
        say(f"  {n} files -> {work}")
        clock.step(
            f"apply {profile.relative_to(ROOT) if profile.is_relative_to(ROOT) else profile}",
            lambda: apply_profile(work, profile, env),
        )
        clock.step("validate params", lambda: validate_params(work, run_env))
        nb = clock.step("git init + baseline commit", lambda: init_repo(work, baseline, env))
        say(f"  {nb} baseline metric files from {baseline}")
        log = work / ".dvc" / "tmp" / "ci-repro.log"
        summary["stages"] = clock.step(
            "dvc repro", lambda: stream(["dvc", "repro"], work, run_env, log, say)
        )
        flags = ["--all"] * args.all + ["--md"] * args.md
        diff = clock.step(
            "dvc metrics diff",
            lambda: sh(
                ["dvc", "metrics", "diff", "HEAD", *flags, "--precision", "4"],
                work,
                run_env,
                "metrics diff",
            ),
        )
        summary["diff"] = diff
        say(diff.rstrip() or "(no metric differences)")
        paths = metric_paths(work, run_env)
        current = {p: json.loads((work / p).read_text()) for p in paths}
        summary["metric_files"] = paths
        base_metrics = read_metric_tree(baseline) if baseline.is_dir() else {}
        problems = clock.step(
            "check metrics against the baseline",
            lambda: check_metrics(base_metrics, current) + check_non_numeric(base_metrics, current),
        )
        if not base_metrics:
            say(f"  no baseline in {baseline}: nothing to compare (run with --update-baseline)")
        summary["problems"].extend(problems)
        if not args.skip_cache_check:
            summary["problems"].extend(
                clock.step("cache check", lambda: check_caching(work, run_env, say))
            )
        if args.update_baseline:
            if summary["problems"] and base_metrics:
                say("  (updating the baseline despite the problems below)")
            shutil.rmtree(baseline, ignore_errors=True)
            for p in paths:
                dest = baseline / p
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(work / p, dest)
            say(f"  baseline updated: {len(paths)} files in {baseline}")
    finally:
        summary["seconds"] = round(clock.total(), 1)
        summary["steps"] = {name: round(t, 1) for name, t in clock.steps}
        if keep:
            say(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary["ok"] = not summary["problems"]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run_ci(args)
    except CIError as exc:
        print(f"ci_pipeline: FAILED: {exc}", file=sys.stderr)
        return 1
    for p in summary["problems"]:
        print(f"ci_pipeline: problem: {p}", file=sys.stderr)
    status = "ok" if summary["ok"] else f"FAILED ({len(summary['problems'])} problems)"
    print(
        f"ci_pipeline: {status} in {summary['seconds']:.0f}s; steps: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in summary["steps"].items()),
        file=sys.stderr,
    )
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
