"""Streaming safetensors I/O: read a model directory tensor by tensor, write sharded output.

The offline stages (``prune``, ``recover``, ``merge``) use these instead of loading a whole
model, so their peak memory is one decoder layer plus the embeddings, not the model:

* :class:`ShardReader` reads named tensors from a model directory (``model.safetensors`` or the
  shards listed in ``model.safetensors.index.json``). Each read opens the file, copies the
  tensors out and closes it again: safetensors memory-maps the file, and pages of a mapping that
  stays open count in the process's resident set until it is closed.
* :class:`ShardWriter` writes tensors one at a time into shards of at most ``max_shard_bytes``
  (a tensor larger than that gets a shard of its own) and, when there is more than one shard,
  the ``model.safetensors.index.json`` that ``from_pretrained`` reads. Each tensor's bytes go
  straight to a scratch file; the shard is assembled (header, then the bytes copied in chunks)
  when it is full, so the writer holds no tensor after :meth:`ShardWriter.add` returns.

The files are standard safetensors (read back by the ``safetensors`` library in the tests).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from loram.errors import ArtifactError

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "ShardReader",
    "ShardWriter",
    "parse_size",
    "save_file_deterministic",
]

DEFAULT_SHARD_BYTES = 2 * 1024**3
"""Shard size of streamed outputs (2 GiB): a 1.5B bf16 model gives two shards."""

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_COPY_CHUNK = 64 * 1024**2


def parse_size(size: int | str) -> int:
    """``"500MB"`` / ``"2GB"`` / ``"1GiB"`` / an int -> bytes (decimal or binary units)."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 10**6, "GB": 10**9}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    if s.endswith("B"):
        s = s[:-1]
    try:
        return int(s)
    except ValueError:
        raise ValueError(
            f"size {size!r}: expected bytes or a number with KB/MB/GB/KiB/MiB/GiB"
        ) from None


class ShardReader:
    """Tensors of a model directory, read on demand (names, shapes and dtypes from the headers).

    ``prefix`` selects ``{prefix}.safetensors`` / ``{prefix}.safetensors.index.json``.
    """

    def __init__(self, path: str | os.PathLike, prefix: str = "model") -> None:
        from loram.models import RESTORE_HINT, check_safetensors, weight_files

        self.path = Path(path)
        files = weight_files(self.path, prefix)
        if not files:
            raise ArtifactError(
                f"no {prefix}.safetensors (or sharded index) in {self.path}; {RESTORE_HINT}"
            )
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, dict] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            header = check_safetensors(f)
            self.metadata.update(header.get("__metadata__") or {})
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                self.file_of[k] = f
                self.info[k] = v

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: object) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info[name]["shape"])

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype code (``BF16``, ``F32`` ...)."""
        return self.info[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each file opened once, then closed)."""
        from safetensors import safe_open

        names = list(names)
        missing = [n for n in names if n not in self.file_of]
        if missing:
            raise ArtifactError(f"{self.path}: tensors missing from the weights: {missing[:5]}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for n in group:
                    out[n] = fh.get_tensor(n)
        return {n: out[n] for n in names}

    def iter(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` one at a time."""
        for n in names:
            yield n, self.get(n)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (keep ``t`` alive while it is used)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def _header(metadata: dict[str, str], entries: dict[str, dict]) -> bytes:
    """The length-prefixed, 8-byte aligned JSON header of a safetensors file (insertion order)."""
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def save_file_deterministic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """``safetensors.torch.save_file`` with the same bytes for the same input, every run.

    The library writes the metadata from a hash map whose order changes from call to call, so
    two saves of the same masks differ in bytes (and in any digest of the file); here the
    header lists the metadata and tensors in the order given.
    """
    entries, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        entries[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
        blobs.append(t)
    with open(path, "wb") as f:
        f.write(_header(dict(metadata), entries))
        for t in blobs:
            f.write(_tensor_bytes(t))


class ShardWriter:
    """Write tensors one by one into ``out_dir`` as ``{prefix}.safetensors`` or shards + index.

    Use as a context manager or call :meth:`close`; :meth:`add` each tensor once (any order).
    Shards are named ``{prefix}-00001-of-0000N.safetensors`` like transformers names them.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out = Path(out_dir)
        self.max = parse_size(max_shard_bytes)
        if self.max < 1:
            raise ValueError(f"max_shard_bytes = {max_shard_bytes!r} must be positive")
        self.prefix = prefix
        self.metadata = dict(metadata or {"format": "pt"})
        self._shards: list[tuple[Path, list[str]]] = []
        self._entries: dict[str, dict] = {}
        self._names: list[str] = []
        self._size = 0
        self._data: Path | None = None
        self._fh = None
        self.total_size = 0
        self._seen: set[str] = set()
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._names and self._size + nbytes > self.max:
            self._flush()
        if self._fh is None:
            self._data = self.out / f".{self.prefix}-shard{len(self._shards) + 1}.data"
            self._fh = open(self._data, "wb")
        self._fh.write(_tensor_bytes(t))
        self._entries[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._size, self._size + nbytes],
        }
        self._names.append(name)
        self._seen.add(name)
        self._size += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        assert self._fh is not None and self._data is not None
        self._fh.close()
        self._fh = None
        shard = self.out / f".{self.prefix}-shard{len(self._shards) + 1}.safetensors"
        with open(shard, "wb") as f, open(self._data, "rb") as src:
            f.write(_header(self.metadata, {n: self._entries[n] for n in self._names}))
            shutil.copyfileobj(src, f, _COPY_CHUNK)
        self._data.unlink()
        self._data = None
        self._shards.append((shard, self._names))
        self._names, self._entries, self._size = [], {}, 0

    def close(self) -> list[Path]:
        """Finish the last shard, name the shards, write the index; return the weight files."""
        if self._closed:
            return [self.out / n for n in self.files]
        if self._fh is not None:
            self._flush()
        if not self._shards:
            raise ValueError(f"no tensors were written to {self.out}")
        self._closed = True
        n = len(self._shards)
        if n == 1:
            final = self.out / f"{self.prefix}.safetensors"
            self._shards[0][0].rename(final)
            self.files = [final.name]
            return [final]
        weight_map: dict[str, str] = {}
        self.files = []
        for i, (tmp, names) in enumerate(self._shards, 1):
            fname = f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.out / fname)
            self.files.append(fname)
            weight_map.update({k: fname for k in names})
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out / f"{self.prefix}.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
        return [self.out / f for f in self.files]

    def _abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for p in [self._data, *(s for s, _ in self._shards)]:
            if p is not None and Path(p).exists():
                Path(p).unlink()


def bound_heap(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more from their own memory maps (glibc).

    The streaming stages allocate and free one layer's tensors after another. glibc raises its
    mmap threshold after such frees (up to 32 MiB), so later tensors of a few MiB come from the
    heap, which fragments and does not shrink: on the embedded SmolLM2 the streaming magnitude
    pruner peaked at 1.11 GB with glibc's default and at 0.75 GB with a fixed 1 MiB threshold,
    in the same time. Returns False where there is no glibc ``mallopt`` (nothing changed).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
