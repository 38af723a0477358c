#!/usr/bin/env python
"""The code each DVC stage runs, derived from the code, and kept equal to ``dvc.yaml``.

For every stage, the scripts its ``cmd`` runs (``stages/NAME.py``) and the transitive closure
of the ``loram`` modules they import (every ``import`` statement, including the ones inside
functions, and the packages' ``__init__.py``) plus the package data files next to an imported
module (task configs, JSON configs) and the C++ source a module compiles (``csrc/NAME.cpp``
beside ``NAME.py``) are the stage's code. A directory is written instead of
its files when every file under it is in the set.

    python scripts/stage_deps.py            # check: exit 1 and list the differences
    python scripts/stage_deps.py --write    # rewrite the code entries of every stage's deps

Non-code deps (artifacts, metrics) are kept as they are, after the code entries.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "loram"
CODE_PREFIXES = ("stages/", f"{PACKAGE}/", f"{PACKAGE}.")
DATA_SUFFIXES = (".yaml", ".yml", ".json", ".jinja", ".txt")
_SCRIPT = re.compile(r"\bstages/(\w+)\.py\b")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of module ``name`` (``loram.x.y``) under ``root``, or None if it is not ours."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every ``loram`` module ``path`` imports (anywhere in the file), with parent packages."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path, root) if path.is_relative_to(root / PACKAGE) else ""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                pkg = here.split(".") if is_pkg else here.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join([*pkg, mod] if mod else pkg)
            found.add(mod)
            for a in node.names:  # ``from loram.pipeline import train``: a submodule
                if module_file(f"{mod}.{a.name}", root) is not None:
                    found.add(f"{mod}.{a.name}")
    out = set()
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
            sub = ".".join(parts[:i])
            if module_file(sub, root) is not None:
                out.add(sub)
    return out


def closure(scripts: Iterable[Path], root: Path = ROOT) -> set[Path]:
    """The scripts, every ``loram`` file they reach by imports, those packages' data files and
    the C++ sources the modules build (``csrc/NAME.cpp`` beside ``NAME.py``)."""
    files: set[Path] = set()
    todo = [Path(s) for s in scripts]
    seen: set[str] = set()
    while todo:
        f = todo.pop()
        if f in files:
            continue
        files.add(f)
        for name in imports_of(f, root):
            if name not in seen:
                seen.add(name)
                todo.append(module_file(name, root))
    for f in list(files):
        if f.is_relative_to(root / PACKAGE):
            for data in f.parent.iterdir():
                if data.is_file() and data.suffix in DATA_SUFFIXES:
                    files.add(data)
            native = f.parent / "csrc" / f"{f.stem}.cpp"
            if native.is_file():
                files.add(native)
    return files


def _tracked(d: Path) -> list[Path]:
    return [
        p
        for p in d.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc",)
    ]


def compress(files: set[Path], root: Path = ROOT) -> list[str]:
    """Relative paths, a directory in place of its files when all of them are in ``files``."""
    out: set[Path] = set(files)
    dirs = sorted({p.parent for p in files}, key=lambda d: len(d.parts))
    for d in dirs:
        if d == root or not d.is_relative_to(root / PACKAGE) or d == root / PACKAGE:
            continue
        inner = _tracked(d)
        if (
            inner
            and all(p in files for p in inner)
            and not any(d.is_relative_to(x) for x in out if x.is_dir())
        ):
            out = {p for p in out if not p.is_relative_to(d)} | {d}
    return sorted(str(p.relative_to(root)) for p in out)


def scripts_of(cmd: str, root: Path = ROOT) -> list[Path]:
    return [root / "stages" / f"{m}.py" for m in _SCRIPT.findall(cmd)]


def stage_code(root: Path = ROOT) -> dict[str, list[str]]:
    """Stage name (as in dvc.yaml, before foreach expansion) -> its code deps."""
    import yaml

    doc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    out = {}
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        cmd = body["cmd"] if isinstance(body["cmd"], str) else " ".join(body["cmd"])
        scripts = scripts_of(cmd, root)
        if scripts:
            out[name] = compress(closure(scripts, root), root)
    return out


def declared_code(root: Path = ROOT) -> dict[str, list[str]]:
    import yaml

    doc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    out = {}
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        deps = [d for d in body.get("deps", []) if isinstance(d, str)]
        out[name] = sorted(d.rstrip("/") for d in deps if d.startswith(CODE_PREFIXES))
    return out


def differences(root: Path = ROOT) -> list[str]:
    want, have = stage_code(root), declared_code(root)
    problems = []
    for name, code in want.items():
        missing = sorted(set(code) - set(have.get(name, [])))
        extra = sorted(set(have.get(name, [])) - set(code))
        if missing:
            problems.append(f"stage {name}: dvc.yaml does not declare {missing}")
        if extra:
            problems.append(f"stage {name}: dvc.yaml declares {extra}, which it does not run")
    return problems


def write(root: Path = ROOT) -> None:
    """Rewrite the code entries of every stage's deps in dvc.yaml (comments kept)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    path = root / "dvc.yaml"
    doc = y.load(path.read_text(encoding="utf-8"))
    want = stage_code(root)
    for name, stage in doc["stages"].items():
        if name not in want:
            continue
        body = stage["do"] if "do" in stage else stage
        rest = [
            d
            for d in body.get("deps", [])
            if not (isinstance(d, str) and d.startswith(CODE_PREFIXES))
        ]
        seq = CommentedSeq([*want[name], *rest])
        seq.fa.set_flow_style()
        body["deps"] = seq
    with open(path, "w", encoding="utf-8") as f:
        y.dump(doc, f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = ap.parse_args(argv)
    if args.write:
        write()
    problems = differences()
    for p in problems:
        print(p)
    if not problems:
        print("dvc.yaml declares exactly the code every stage runs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
