"""dvc.yaml declares exactly the code each stage runs; the package's imports form layers."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("stage_deps", ROOT / "scripts" / "stage_deps.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("stage_deps", mod)
    spec.loader.exec_module(mod)
    return mod


sd = _load()


def test_dvc_yaml_declares_exactly_the_code_each_stage_runs():
    problems = sd.differences()
    assert not problems, "\n".join(problems) + "\nrun: python scripts/stage_deps.py --write"


def _copy_project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("loram", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")
    return root


def test_removing_a_declared_dependency_is_caught(tmp_path):
    root = _copy_project(tmp_path)
    text = (root / "dvc.yaml").read_text()
    # recover's code includes loram/recover.py: drop it from that stage's deps only.
    start = text.index("\n  recover:")
    end = text.index("\n  merge:", start)
    block = text[start:end]
    assert "loram/recover.py, " in block
    (root / "dvc.yaml").write_text(
        text[:start] + block.replace("loram/recover.py, ", "", 1) + text[end:]
    )
    problems = sd.differences(root)
    assert problems == ["stage recover: dvc.yaml does not declare ['loram/recover.py']"]


def test_a_new_import_must_be_declared(tmp_path):
    root = _copy_project(tmp_path)
    (root / "loram" / "extra_helper.py").write_text("X = 1\n")
    f = root / "loram" / "recover.py"
    f.write_text(f.read_text() + "\n\ndef _late():\n    from loram import extra_helper  # noqa\n")
    problems = sd.differences(root)
    importers = {name for name, code in sd.stage_code().items() if "loram/recover.py" in code}
    assert {"recover", "merge", "evaluate"} <= importers and "prune" not in importers
    assert problems == [
        f"stage {name}: dvc.yaml does not declare ['loram/extra_helper.py']"
        for name in sd.stage_code()
        if name in importers
    ]


def _tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (relative path -> text) under ``root``."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_closure_follows_every_import_form(tmp_path):
    root = _tree(
        tmp_path / "r",
        {
            "loram/__init__.py": "",
            "loram/sub/__init__.py": "",
            "loram/sub/conf.yaml": "a: 1\n",
            "loram/sub/a.py": "from . import b\n",
            "loram/sub/b.py": "def f():\n    import loram.c\n",
            "loram/c.py": "from loram.sub import d\n",
            "loram/sub/d.py": "import json\n",
            "loram/unused.py": "",
            "stages/s.py": "from loram.sub.a import *\n",
        },
    )
    files = sd.closure([root / "stages" / "s.py"], root)
    rel = sorted(str(p.relative_to(root)) for p in files)
    assert rel == [
        "loram/__init__.py",
        "loram/c.py",
        "loram/sub/__init__.py",
        "loram/sub/a.py",
        "loram/sub/b.py",
        "loram/sub/conf.yaml",
        "loram/sub/d.py",
        "stages/s.py",
    ]
    assert sd.compress(files, root) == [
        "loram/__init__.py",
        "loram/c.py",
        "loram/sub",
        "stages/s.py",
    ]


def test_closure_includes_the_cpp_source_a_module_builds(tmp_path):
    root = _tree(
        tmp_path / "r",
        {
            "loram/__init__.py": "",
            "loram/native.py": "",
            "loram/csrc/native.cpp": "// built by native.py\n",
            "loram/csrc/other.cpp": "// nobody imports other.py\n",
            "stages/s.py": "import loram.native\n",
            "stages/t.py": "import loram\n",
        },
    )
    rel = sorted(str(p.relative_to(root)) for p in sd.closure([root / "stages" / "s.py"], root))
    assert rel == ["loram/__init__.py", "loram/csrc/native.cpp", "loram/native.py", "stages/s.py"]
    rel = sorted(str(p.relative_to(root)) for p in sd.closure([root / "stages" / "t.py"], root))
    assert rel == ["loram/__init__.py", "stages/t.py"]


# Layers, bottom to top: a module may import its own layer or lower ones, never higher.
LAYERS = [
    ("loram", "loram.errors", "loram.fsio", "loram.benchmarks", "loram.tiny"),
    ("loram.config",),
    (
        "loram.models",
        "loram.install",
        "loram.convert",
        "loram.shards",
        "loram.block_cache",
        "loram.data",
        "loram.loss",
        "loram.quant",
        "loram.prune",
    ),
    ("loram.trainloop", "loram.distributed"),
    ("loram.train", "loram.recover", "loram.merge", "loram.evaluate", "loram.memory"),
    ("loram.pipeline", "loram.report", "loram.profiles", "loram.plan"),
    ("loram.cli",),
]


def _layer(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is None:
        raise AssertionError(f"module {name} is in no layer of tests/test_stage_deps.py")
    return best[0]


def _graph() -> dict[str, set[str]]:
    out = {}
    for f in sorted((ROOT / "loram").rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        name = sd._module_name(f, ROOT)
        deps = sd.imports_of(f)
        # importing a.b.c also runs package a and a.b: not an arrow of this module's own
        out[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return out


def test_no_import_points_up():
    up = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in _graph().items()
        for b in deps
        if _layer(b) > _layer(a)
    ]
    assert not up, "\n".join(up)


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, n, m]))
            if m not in state:
                visit(m, [*path, n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_every_stage_has_a_module_named_after_it():
    import yaml

    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        for script in sd.scripts_of(body["cmd"]):
            mod = script.stem if script.stem != "params" else "check"
            assert (ROOT / "loram" / "pipeline" / f"{mod}.py").is_file(), (name, script)
            assert f"loram.pipeline import {mod}" in script.read_text(), script
