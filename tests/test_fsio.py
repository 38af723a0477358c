"""The one atomic writer: guards, markers, roll-back, stale temp clean-up, deterministic JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loram.fsio import (
    MARKER,
    OutputError,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    clean_stale,
    dumps,
)


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_its_own_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "train") as tmp:
        (tmp / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, "train") as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "keep.txt").read_text() == "old"
    with atomic_dir(out, "train") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert json.loads((out / MARKER).read_text()) == {"command": "train", "format": 1}


def test_marker_bytes_are_the_same_every_time(tmp_path):
    for name in ("a", "b"):
        with atomic_dir(tmp_path / name, "merge"):
            pass
    assert (tmp_path / "a" / MARKER).read_bytes() == (tmp_path / "b" / MARKER).read_bytes()


def _project(tmp_path):
    root = tmp_path / "proj"
    (root / "artifacts" / "base").mkdir(parents=True)
    (root / "artifacts" / "base" / "model.safetensors").write_text("w")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine")
    (root / "README.md").write_text("readme")
    return root


@pytest.mark.parametrize(
    "out,needle",
    [
        (".", "working directory"),
        ("..", "parent of the working directory"),
        ("/", "parent of the working directory"),
        ("artifacts", "contains the input"),
        ("artifacts/base", "is the input"),
        ("artifacts/base/sub", "inside the input"),
        ("README.md", "existing file"),
        ("notes", "not written by loram"),
        ("", "empty"),
    ],
)
def test_guard_refuses(tmp_path, monkeypatch, out, needle):
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    with pytest.raises(OutputError, match=needle):
        check_output_dir(out, "merge", inputs=["artifacts/base"])
    with pytest.raises(OutputError, match=needle):
        with atomic_dir(out, "merge", inputs=["artifacts/base"]):
            raise AssertionError("the body must not run")
    assert (root / "notes" / "todo.txt").read_text() == "mine"
    assert (root / "README.md").read_text() == "readme"


def test_guard_refuses_a_project_root_elsewhere_and_another_commands_output(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "params.yaml").write_text("x: 1\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="project root"):
        check_output_dir(other, "merge")
    with atomic_dir(work / "made", "base"):
        pass
    with pytest.raises(OutputError, match="`loram base`, not of `loram merge`"):
        check_output_dir(work / "made", "merge")
    check_output_dir(work / "made", "base")  # its own output: fine
    (work / "empty").mkdir()
    check_output_dir(work / "empty", "merge")  # an empty directory destroys nothing


def test_symlink_target_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError):
        check_output_dir("link", "merge")


def test_stale_temp_of_a_dead_process_is_removed_live_one_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc"
    stale.mkdir()
    stale_file = tmp_path / f".m.json.tmp-{dead.pid}-abc"
    stale_file.write_text("{")
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"
    live.mkdir()
    assert clean_stale(tmp_path, "out") == [stale]
    assert live.exists() and stale_file.exists()
    atomic_write_text(tmp_path / "m.json", "{}")
    assert not stale_file.exists()


def test_deterministic_json():
    a = dumps({"b": {3, 1, 2}, "a": (1, 2), "c": float("nan"), "d": {"y": 1, "x": 2}})
    b = dumps({"d": {"x": 2, "y": 1}, "c": float("nan"), "a": [1, 2], "b": {2, 3, 1}})
    assert a == b
    assert json.loads(a) == {"a": [1, 2], "b": [1, 2, 3], "c": None, "d": {"x": 2, "y": 1}}


def test_atomic_write_json_refuses_a_directory_and_leaves_no_temp(tmp_path):
    (tmp_path / "d.json").mkdir()
    with pytest.raises(OutputError, match="directory"):
        atomic_write_json(tmp_path / "d.json", {})
    atomic_write_json(tmp_path / "m.json", {"z": 1, "a": 2})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2,\n  "z": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "m.json"]
