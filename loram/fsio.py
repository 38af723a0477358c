"""The one way loram writes files: atomically, deterministically, and never over what it did not make.

* :func:`atomic_dir` yields a temporary sibling directory; on success the directory gets an
  output marker, every file is fsync'ed and the directory is renamed over the target. On an
  error the temporary directory is removed and the target is left as it was.
* :func:`atomic_write_text` / :func:`atomic_write_json` do the same for one file. JSON is
  written with sorted keys and sets as sorted lists, so the same inputs give the same bytes.
* :func:`check_output_dir` refuses a target that the tool did not create: an existing path
  without the marker of the same command, a file, the working directory or the project root,
  an ancestor of the working directory, and any path that contains (or lies inside) an input.
* A killed run leaves ``.NAME.tmp-PID-*`` siblings; the next write of the same target removes
  those whose process is gone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loram.errors import ArtifactError, LoramError

MARKER = ".loram-output.json"
"""Written inside every output directory: which ``loram`` command produced it."""

PROJECT_FILES = (".git", ".dvc", "dvc.yaml", "params.yaml", "pyproject.toml")
"""A directory holding one of these is a project root: never an output."""


class OutputError(LoramError):
    """An output path the tool refuses to write (it would destroy something it did not create)."""


# ---------------------------------------------------------------------------------------------
# Deterministic JSON


def canonical(obj: Any) -> Any:
    """``obj`` with sets/frozensets as sorted lists and tuples as lists (recursively)."""
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, set | frozenset):
        return sorted((canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Deterministic JSON: sorted keys, sets sorted, NaN as null, newline at the end."""
    return json.dumps(canonical(obj), indent=indent, sort_keys=True, default=str) + "\n"


# ---------------------------------------------------------------------------------------------
# Reading


def read_json(path: str | os.PathLike, hint: str = "") -> Any:
    """Parse the JSON file ``path``; a malformed file raises :class:`ArtifactError` naming it."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(
            f"{p} is not valid JSON ({exc})" + (f"; {hint}" if hint else "")
        ) from None


def read_json_object(path: str | os.PathLike, hint: str = "") -> dict:
    """:func:`read_json` for a file that must hold a JSON object."""
    obj = read_json(path, hint)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{Path(path)} is not a JSON object")
    return obj


# ---------------------------------------------------------------------------------------------
# Guards


def _is_project_root(p: Path) -> bool:
    return any((p / name).exists() for name in PROJECT_FILES)


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def read_marker(path: str | os.PathLike) -> dict | None:
    """The output marker of directory ``path``, or None."""
    f = Path(path) / MARKER
    if not f.is_file():
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def check_output_dir(
    out: str | os.PathLike,
    command: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "--out",
) -> Path:
    """Raise :class:`OutputError` unless ``out`` may be (re)written by ``command``.

    Allowed: a path that does not exist, an empty directory, or a directory whose marker says
    ``command`` wrote it. Refused: files, the working directory, a project root, an ancestor of
    the working directory, a path that contains or lies inside one of ``inputs``, and any other
    existing directory.
    """
    raw = str(out)
    if not raw.strip():
        raise OutputError(f"{option} is empty: give a directory path for the output")
    p = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, p):
        what = "the working directory" if p == cwd else "a parent of the working directory"
        raise OutputError(
            f"{option} {raw!r} is {what}; refusing to replace it (pick a new directory, e.g. "
            f"artifacts/{command}-out)"
        )
    if p.exists() and _is_project_root(p):
        raise OutputError(f"{option} {raw!r} is a project root; refusing to replace it")
    for inp in inputs:
        if not inp or str(inp) in ("none", ""):
            continue
        q = Path(inp).expanduser().resolve()
        if _within(q, p):
            raise OutputError(
                f"{option} {raw!r} {'is' if q == p else 'contains'} the input {str(inp)!r}; "
                "writing there would destroy the input"
            )
        if _within(p, q) and q.is_dir():
            raise OutputError(
                f"{option} {raw!r} lies inside the input {str(inp)!r}; write the output elsewhere"
            )
    if Path(out).expanduser().is_symlink():
        raise OutputError(f"{option} {raw!r} is a symbolic link; refusing to replace it")
    if p.exists() and not p.is_dir():
        raise OutputError(
            f"{option} {raw!r} is an existing file, not a directory; refusing to replace it"
        )
    if p.is_dir() and any(p.iterdir()):
        marker = read_marker(p)
        if marker is None:
            raise OutputError(
                f"{option} {raw!r} exists and was not written by loram (no {MARKER} inside); "
                "refusing to replace it. Choose another path, or remove it yourself if you are "
                "sure"
            )
        if marker.get("command") != command:
            raise OutputError(
                f"{option} {raw!r} holds the output of `loram {marker.get('command')}`, not of "
                f"`loram {command}`; refusing to replace it"
            )
    return p


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...], option: str) -> Path:
    """A metrics/plots file path: right suffix, not a directory, not the project root."""
    raw = str(path)
    p = Path(path).expanduser()
    if p.suffix.lower() not in suffixes:
        raise OutputError(
            f"{option} {raw!r} must end in {' or '.join(suffixes)} (refusing to overwrite other files)"
        )
    if p.is_dir():
        raise OutputError(f"{option} {raw!r} is a directory, expected a file path")
    return p


# ---------------------------------------------------------------------------------------------
# Writers


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` left in ``parent`` by dead processes."""
    removed = []
    if not parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for leftover in parent.glob(f".{name}.{kind}-*"):
            pid_s = leftover.name[len(f".{name}.{kind}-") :].split("-", 1)[0]
            pid = int(pid_s) if pid_s.isdigit() else -1
            if pid == os.getpid() or _pid_alive(pid):
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(
    out_dir: str | os.PathLike,
    command: str,
    inputs: Iterable[str | os.PathLike | None] = (),
):
    """Yield a fresh temp dir beside ``out_dir``; on success it replaces ``out_dir``.

    ``command`` names the producer; it is written into the marker, and an existing ``out_dir``
    is replaced only if it carries the marker of the same command (see
    :func:`check_output_dir`). On an exception the temp dir is removed and ``out_dir`` is left
    as it was.
    """
    out = check_output_dir(out_dir, command, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        (tmp / MARKER).write_text(dumps({"command": command, "format": 1}), encoding="utf-8")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp sibling, fsync, rename over ``path``; remove the temp on error."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a directory, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps(obj))
