"""Faults and bad inputs through the ``loram`` CLI: every case exits non-zero with one clear
line naming the bad thing, no traceback, and no file lost. Also: deterministic artifacts, a
killed ``train`` that resumes to byte-identical output, clean-up of a killed run's leftovers.

A tiny pipeline (tiny-llama, byte tokenizer, a few rows and steps) is built once per module in
a temporary project; each case works on it or on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tinyproject import SOURCES, write_sources

from loram.cli import main

PARAMS = {
    "base": {"model": "tiny-llama"},
    "data": SOURCES,
    "prune": {"calib_samples": 2, "calib_seq_len": 64},
    "align": {"max_steps": 2, "warmup_steps": 0, "micro_batch": 2, "seq_len": 64, "save_every": 1},
    "train": {
        "max_steps": 4,
        "warmup_steps": 1,
        "micro_batch": 2,
        "seq_len": 96,
        "save_every": 2,
        "eval_every": 2,
        "max_val_rows": 2,
    },
    "eval": {"ppl_max_rows": 2, "ppl_seq_len": 64, "batch_size": 2, "tasks": []},
}


def _write_project(root: Path) -> None:
    write_sources(root, n_train=24, n_ood=6, n_align=40)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    (root / "README.md").write_text("keep me\n")


STAGES = [
    ["base", "--out", "artifacts/base", "--metrics", "metrics/base.json"],
    ["data", "--out", "artifacts/data", "--metrics", "metrics/data.json"],
    ["prune", "--base", "artifacts/base", "--data", "artifacts/data", "--out", "artifacts/pruned",
     "--metrics", "metrics/prune.json"],
    ["align", "--pruned", "artifacts/pruned", "--data", "artifacts/data", "--out",
     "artifacts/aligned", "--checkpoints", "artifacts/checkpoints/align", "--metrics",
     "metrics/align.json", "--plots", "plots/align.csv"],
    ["train", "--model", "artifacts/aligned", "--data", "artifacts/data", "--out",
     "artifacts/adapter_pruned", "--checkpoints", "artifacts/checkpoints/train", "--metrics",
     "metrics/train.json", "--plots", "plots/train.csv"],
    ["recover", "--adapter", "artifacts/adapter_pruned", "--pruned", "artifacts/aligned", "--base",
     "artifacts/base", "--out", "artifacts/adapter"],
    ["merge", "--base", "artifacts/base", "--adapter", "artifacts/adapter", "--pruned",
     "artifacts/aligned", "--out", "artifacts/merged", "--metrics", "metrics/merge.json"],
]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proj")
    _write_project(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for argv in STAGES:
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def proj(built, tmp_path, monkeypatch) -> Path:
    """A private copy of the built project (cases may damage it), as the working directory."""
    root = tmp_path / "proj"
    shutil.copytree(built, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Digest of every file under ``root`` (to prove nothing was lost or changed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err + cap.out


def _fails(capsys, argv: list[str], *needles: str) -> str:
    rc, text = _run(capsys, argv)
    assert rc == 2, (argv, rc, text)
    assert "Traceback" not in text, text
    err = [ln for ln in text.splitlines() if ln.startswith(f"loram {argv[0]}: error:")]
    assert len(err) == 1, text
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _stage(name: str) -> list[str]:
    return list(next(s for s in STAGES if s[0] == name))


def _with(argv: list[str], **opts: str) -> list[str]:
    argv = list(argv)
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        argv[argv.index(flag) + 1] = v
    return argv


# ------------------------------------------------------------------ never destroy what it did not make

OUT_CASES = [
    (".", "working directory"),
    ("..", "parent of the working directory"),
    ("artifacts", "contains the input"),
    ("README.md", "existing file"),
    ("artifacts/base", "is the input"),
    ("artifacts/merged", "`loram merge`"),
    ("src", "not written by loram"),
    ("artifacts/adapter_pruned/sub", "inside the input"),
]


@pytest.mark.parametrize("out,needle", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_recover_refuses_an_output_it_did_not_create(proj, capsys, out, needle):
    before = _snapshot(proj)
    _fails(capsys, _with(_stage("recover"), out=out), needle, repr(out))
    assert _snapshot(proj) == before


def test_every_command_guards_its_output(proj, capsys):
    before = _snapshot(proj)
    for argv in STAGES:
        _fails(capsys, _with(argv, out="."), "working directory")
        _fails(capsys, _with(argv, out="README.md"), "existing file")
    _fails(capsys, _with(_stage("merge"), metrics="README.md"), "--metrics", ".json")
    _fails(capsys, _with(_stage("train"), plots="README.md"), "--plots", ".csv")
    assert _snapshot(proj) == before


def test_a_previous_output_of_the_same_command_is_replaced(proj, capsys):
    rc, text = _run(capsys, _stage("recover"))
    assert rc == 0, text
    marker = json.loads((proj / "artifacts/adapter/.loram-output.json").read_text())
    assert marker["command"] == "recover"


def test_leftovers_of_a_killed_run_are_removed(proj, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = proj / "artifacts" / f".adapter.tmp-{dead.pid}-x1y2"
    (stale / "half").mkdir(parents=True)
    alive = proj / "artifacts" / f".adapter.tmp-{os.getppid()}-x1y2"  # a live process: kept
    alive.mkdir()
    rc, text = _run(capsys, _stage("recover"))
    assert rc == 0, text
    assert not stale.exists() and alive.exists()


# ------------------------------------------------------------------ provenance


def test_adapter_of_another_pruning_is_refused(proj, capsys):
    prune = _with(_stage("prune"), out="artifacts/pruned_rand", metrics="metrics/p2.json")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prune"]["method"] = "random"
    (proj / "rand.yaml").write_text(yaml.safe_dump(params))
    assert main([*prune, "--params", "rand.yaml"]) == 0
    train = _with(
        _stage("train"),
        model="artifacts/pruned_rand",
        out="artifacts/adapter_rand",
        checkpoints="artifacts/checkpoints/rand",
        metrics="metrics/t2.json",
        plots="plots/t2.csv",
    )
    assert main(train) == 0
    capsys.readouterr()
    msg = _fails(
        capsys,
        _with(_stage("recover"), adapter="artifacts/adapter_rand", out="artifacts/x"),
        "artifacts/adapter_rand",
        "artifacts/pruned_rand",
        "artifacts/aligned",
    )
    assert "different pruning" in msg
    assert not (proj / "artifacts/x").exists()


def test_merge_refuses_an_unrecovered_adapter(proj, capsys):
    _fails(
        capsys,
        _with(_stage("merge"), adapter="artifacts/adapter_pruned", out="artifacts/m2"),
        "recover it first",
        "artifacts/adapter_pruned",
    )


def test_merge_refuses_a_foreign_adapter_by_shape(proj, capsys):
    # An adapter made outside loram (no provenance) with the pruned shapes.
    foreign = proj / "foreign"
    shutil.copytree(proj / "artifacts/adapter_pruned", foreign)
    (foreign / "loram_train.json").unlink()
    (foreign / ".loram-output.json").unlink()
    msg = _fails(
        capsys,
        _with(_stage("merge"), adapter="foreign", pruned="none", out="artifacts/m3"),
        "foreign",
        "has shape",
    )
    assert "needs" in msg


def test_recovering_twice_is_refused(proj, capsys):
    _fails(
        capsys,
        _with(_stage("recover"), adapter="artifacts/adapter", out="artifacts/a2"),
        "already recovered",
    )


# ------------------------------------------------------------------ broken artifacts and inputs


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


ARTIFACT_CASES = {
    "truncated base weights": (
        lambda p: _truncate(p / "artifacts/base/model.safetensors"),
        "prune",
        ["artifacts/base/model.safetensors", "dvc checkout"],
    ),
    "truncated pruned weights": (
        lambda p: _truncate(p / "artifacts/aligned/model.safetensors"),
        "train",
        ["artifacts/aligned/model.safetensors", "truncated"],
    ),
    "truncated adapter weights": (
        lambda p: _truncate(p / "artifacts/adapter_pruned/adapter_model.safetensors"),
        "recover",
        ["adapter_model.safetensors", "dvc checkout"],
    ),
    "truncated recovered adapter": (
        lambda p: _truncate(p / "artifacts/adapter/adapter_model.safetensors", 0.9),
        "merge",
        ["artifacts/adapter/adapter_model.safetensors"],
    ),
    "broken config.json": (
        lambda p: (p / "artifacts/base/config.json").write_text("{ not json"),
        "prune",
        ["artifacts/base/config.json", "not valid JSON"],
    ),
    "base without weights": (
        lambda p: (p / "artifacts/base/model.safetensors").unlink(),
        "merge",
        ["artifacts/base", "no weights"],
    ),
    "aligned dir without manifest": (
        lambda p: (p / "artifacts/aligned/loram_manifest.json").unlink(),
        "train",
        ["loram_manifest.json", "artifacts/aligned"],
    ),
    "manifest missing for recover": (
        lambda p: (p / "artifacts/aligned/loram_manifest.json").unlink(),
        "recover",
        ["loram_manifest.json"],
    ),
    "truncated training data": (
        lambda p: _truncate(p / "artifacts/data/train.jsonl", 0.7),
        "train",
        ["train.jsonl", "line"],
    ),
    "broken adapter config": (
        lambda p: (p / "artifacts/adapter/adapter_config.json").write_text("[1,"),
        "merge",
        ["adapter_config.json"],
    ),
    "missing data dir": (
        lambda p: shutil.rmtree(p / "artifacts/data"),
        "prune",
        ["artifacts/data/train.jsonl", "does not exist"],
    ),
}


@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
def test_broken_artifact_is_named(proj, capsys, case):
    damage, command, needles = ARTIFACT_CASES[case]
    damage(proj)
    out = {"prune": "artifacts/p9", "train": "artifacts/t9", "recover": "artifacts/r9"}.get(
        command, "artifacts/m9"
    )
    _fails(capsys, _with(_stage(command), out=out), *needles)
    assert not (proj / out).exists()


MISSING_PATH_CASES = [
    ("recover", "base"),
    ("prune", "base"),
    ("train", "model"),
    ("recover", "adapter"),
    ("recover", "pruned"),
    ("merge", "base"),
    ("merge", "adapter"),
    ("align", "pruned"),
]


@pytest.mark.parametrize("command,opt", MISSING_PATH_CASES, ids=lambda v: str(v))
def test_missing_input_path_is_named(proj, capsys, command, opt):
    _fails(capsys, _with(_stage(command), **{opt: "artifacts/nope"}), "artifacts/nope")


EVALUATE = [
    "evaluate", "--model", "artifacts/merged", "--data", "artifacts/data", "--tokenizer",
    "artifacts/base", "--out", "metrics/arms/x.json",
]  # fmt: skip

EVALUATE_CASES = {
    "missing model": ({"model": "artifacts/nope"}, None, ["artifacts/nope"]),
    "missing adapter": (
        {"model": "artifacts/aligned", "adapter": "artifacts/nope"},
        None,
        ["artifacts/nope"],
    ),
    "truncated merged model": (
        {},
        lambda p: _truncate(p / "artifacts/merged/model.safetensors"),
        ["artifacts/merged/model.safetensors"],
    ),
    "out is not json": ({"out": "README.md"}, None, ["README.md", ".json"]),
    "broken train metrics": (
        {"train_metrics": "metrics/train.json"},
        lambda p: (p / "metrics/train.json").write_text("{"),
        ["metrics/train.json"],
    ),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_faults_are_named(proj, capsys, case):
    opts, damage, needles = EVALUATE_CASES[case]
    if damage:
        damage(proj)
    argv = list(EVALUATE)
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = v
        else:
            argv += [flag, v]
    before = (proj / "README.md").read_bytes()
    _fails(capsys, argv, *needles)
    assert (proj / "README.md").read_bytes() == before
    assert not (proj / "metrics/arms/x.json").exists()


def test_evaluate_runs_on_the_tiny_pipeline(proj, capsys):
    rc, text = _run(capsys, EVALUATE)
    assert rc == 0, text
    assert "ppl" in json.loads((proj / "metrics/arms/x.json").read_text())


BASE_CASES = {
    "dir with broken config": (
        lambda p: (p / "m").mkdir() or (p / "m/config.json").write_text("{"),
        "m",
        ["m/config.json"],
    ),
    "dir without weights": (
        lambda p: (p / "m").mkdir() or (p / "m/config.json").write_text('{"model_type": "llama"}'),
        "m",
        ["'m'", "no weights"],
    ),
    "corrupt gguf": (
        lambda p: (p / "x.gguf").write_bytes(b"GGUF" + b"\0" * 64),
        "x.gguf",
        ["x.gguf"],
    ),
    "missing gguf": (lambda p: None, "nope.gguf", ["nope.gguf"]),
}


@pytest.mark.parametrize("case", sorted(BASE_CASES))
def test_bad_base_model_is_named(proj, capsys, case):
    damage, model, needles = BASE_CASES[case]
    damage(proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["base"]["model"] = model
    (proj / "b.yaml").write_text(yaml.safe_dump(params))
    _fails(capsys, [*_with(_stage("base"), out="artifacts/b2"), "--params", "b.yaml"], *needles)
    assert not (proj / "artifacts/b2").exists()


def test_corrupt_checkpoint_is_set_aside_and_training_starts_afresh(proj, capsys):
    ckpt = proj / "artifacts/checkpoints/train/last"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"fingerprint": "x", "step": 2, "hist')
    argv = _with(_stage("train"), out="artifacts/t2", metrics="metrics/t2.json")
    rc, text = _run(capsys, argv)
    assert rc == 0, text
    assert (ckpt.parent / "last.corrupt" / "state.json").is_file()
    # A checkpoint whose tensors are truncated (same fingerprint) is set aside too.
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["keep_checkpoint"] = True
    (proj / "keep.yaml").write_text(yaml.safe_dump(params))
    argv = [*_with(argv, out="artifacts/t3"), "--params", "keep.yaml"]
    assert main(argv) == 0
    assert (ckpt / "trainable.safetensors").is_file()
    _truncate(ckpt / "trainable.safetensors")
    (ckpt / "state.json").write_text(
        json.dumps({**json.loads((ckpt / "state.json").read_text()), "step": 2})
    )
    assert main(_with(argv, out="artifacts/t4")) == 0
    assert (ckpt.parent / "last.corrupt" / "trainable.safetensors").is_file()
    same = [(proj / f"artifacts/{d}/adapter_model.safetensors").read_bytes() for d in ("t3", "t4")]
    assert same[0] == same[1]


def test_checkpoint_removed_after_completion_unless_kept(proj):
    assert not (proj / "artifacts/checkpoints/train/last").exists()
    assert not (proj / "artifacts/checkpoints/align/last").exists()
    assert not list((proj / "artifacts/checkpoints/train").glob(".tmp-*"))


# ------------------------------------------------------------------ params and data


def test_misspelled_section_is_an_error_in_every_command(proj, capsys):
    (proj / "params.yaml").write_text((proj / "params.yaml").read_text() + "prun: {ratio: 0.3}\n")
    _fails(capsys, ["check"], "prun", "not a known params section")
    for argv in STAGES:
        _fails(capsys, _with(argv, out="artifacts/zz"), "prun")


def test_variant_without_name(proj, capsys):
    _fails(capsys, ["variant"], "--name")


def test_check_writes_the_same_bytes_for_every_valid_params_file(proj, capsys):
    assert main(["check", "--out", "a.json"]) == 0
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prune"]["ratio"] = 0.3
    (proj / "other.yaml").write_text(yaml.safe_dump(params))
    assert main(["check", "--params", "other.yaml", "--out", "b.json"]) == 0
    assert (proj / "a.json").read_bytes() == (proj / "b.json").read_bytes()


DATA_CASES = {
    "malformed json line": ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a",\n', ["line 3"]),
    "rows are arrays": ('["a", "b"]\n', ["line 1"]),
    "null prompt": ('{"prompt": null, "response": "b"}\n', ["prompt"]),
    "empty response": ('{"prompt": "a", "response": "  "}\n', ["response"]),
    "unknown schema": ('{"foo": "a"}\n', ["foo"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_training_data_is_named_with_its_line(proj, capsys, case):
    text, needles = DATA_CASES[case]
    (proj / "src/train.jsonl").write_text(text)
    _fails(capsys, _with(_stage("data"), out="artifacts/d2"), "src/train.jsonl", *needles)


def test_csv_empty_cell_is_not_trained_as_nan(proj, capsys):
    (proj / "src/train.csv").write_text("prompt,response\nq1,a1\nq2,\nq3,a3\n")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"]["train"] = {"kind": "file", "name": "src/train.csv"}
    (proj / "csv.yaml").write_text(yaml.safe_dump(params))
    _fails(
        capsys,
        [*_with(_stage("data"), out="artifacts/d3"), "--params", "csv.yaml"],
        "src/train.csv",
        "response",
    )


# ------------------------------------------------------------------ determinism and resume (subprocesses)


def _cli(args: list[str], cwd: Path, seed: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONHASHSEED=seed, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "loram.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_train_is_byte_identical_across_processes_and_resumes_after_sigkill(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"].update(max_steps=40, save_every=2, eval_every=40)
    (proj / "long.yaml").write_text(yaml.safe_dump(params))

    def argv(out: str, ckpt: str) -> list[str]:
        return [
            *_with(
                _stage("train"),
                out=out,
                checkpoints=ckpt,
                metrics=f"metrics/{Path(out).name}.json",
                plots=f"plots/{Path(out).name}.csv",
            ),
            "--params",
            "long.yaml",
        ]

    # Two uninterrupted runs under different hash seeds: byte-identical adapters.
    for i in (1, 2):
        run = _cli(argv(f"artifacts/ref{i}", f"ckpt/ref{i}"), proj, str(i))
        log, _ = run.communicate(timeout=600)
        assert run.returncode == 0, log
    a, b = _files(proj / "artifacts/ref1"), _files(proj / "artifacts/ref2")
    assert set(a) >= {"adapter_config.json", "adapter_model.safetensors", "loram_train.json"}
    assert a == b

    # Killed after its first checkpoint, then re-run: resumes and ends byte-identical.
    killed = _cli(argv("artifacts/crash", "ckpt/crash"), proj, "3")
    state = proj / "ckpt/crash/last/state.json"
    deadline = time.time() + 300
    while not state.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert state.exists(), "no checkpoint appeared before the run ended"
    assert not (proj / "artifacts/crash").exists(), "the run finished before it was killed"
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 40
    again = _cli(argv("artifacts/crash", "ckpt/crash"), proj, "4")
    log, _ = again.communicate(timeout=600)
    assert again.returncode == 0, log
    assert f"at step {step}" in log and "resuming" in log, log
    assert _files(proj / "artifacts/crash") == a
    assert not list(proj.glob("artifacts/.crash.tmp-*")), "a killed run's temp dir was left"


def test_unknown_hub_id_offline_is_one_line(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["base"]["model"] = "no-such-org/no-such-model-xyz"
    (proj / "hub.yaml").write_text(yaml.safe_dump(params))
    p = _cli(["base", "--params", "hub.yaml", "--out", "artifacts/b2"], proj, "0")
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 2, log
    assert "Traceback" not in log
    assert "no-such-org/no-such-model-xyz" in log and "hub" in log
