"""Stream a model into a plain safetensors directory, one tensor at a time.

The ``base`` stage converts its model here. A GGUF file (embedded, installed or given as a path)
or a directory of safetensors (local or a hub snapshot) is read tensor by tensor, cast to the
target dtype and written into safetensors shards of at most ``shard_bytes`` with an index
(``model.safetensors.index.json``), so the peak memory is about one shard plus one tensor,
not the model. The result is bit for bit what ``from_pretrained`` + ``save_pretrained`` give
(tests/test_convert.py): names, shapes, values, tied embeddings and the config.

GGUF names map to transformers names with transformers' own GGUF tables
(:func:`transformers.modeling_gguf_pytorch_utils.get_gguf_hf_weights_map`) and its tensor
processors (the q/k row permutation of Llama-family GGUFs); quantized tensors dequantize with
the ``gguf`` package, in row chunks where the processor leaves rows alone. Architectures whose
GGUF tensors need more than that (MoE experts, Bloom, ...) and checkpoints whose names or shapes
are not those of the transformers model (legacy ``.bin`` files, renamed keys) fall back to
loading the whole model, with a log line saying so.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loram.errors import ArtifactError, LoramError
from loram.fsio import atomic_dir

log = logging.getLogger(__name__)

SHARD_BYTES = 512 * 2**20
"""Default shard size: bounds the memory of a streamed conversion (one shard + one tensor)."""

CHUNK_BYTES = 64 * 2**20
"""GGUF tensors are read and dequantized in row chunks of about this many (output) bytes."""

# safetensors dtype codes -> torch dtypes (the ones model weights use)
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Write tensors one at a time into ``prefix-0000i-of-0000N.safetensors`` shards of at most
    ``shard_bytes`` (a larger tensor gets a shard of its own) plus the index transformers reads;
    a model that fits one shard is written as ``prefix.safetensors`` without an index, as
    ``save_pretrained`` does. Only the pending shard is held in memory.
    """

    def __init__(self, out_dir: str | Path, shard_bytes: int = SHARD_BYTES, prefix: str = "model"):
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes = {shard_bytes}; expected > 0")
        self.out = Path(out_dir)
        self.shard_bytes = shard_bytes
        self.prefix = prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # names per written shard
        self.total_bytes = 0
        self.shapes: dict[str, tuple[int, ...]] = {}

    def make_room(self, nbytes: int) -> None:
        """Write the pending shard now if a tensor of ``nbytes`` will not fit in it: called before
        the tensor is built, so the pending shard and a large new tensor are never both held."""
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.shapes:
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        self.make_room(nbytes)
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.shapes[name] = tuple(tensor.shape)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / self._tmp_name(len(self.files))
        save_file(self.pending, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors writes through a private temp file (0600)
        self.files.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _tmp_name(self, i: int) -> str:
        return f"{self.prefix}-part{i + 1:05d}.safetensors"

    def close(self) -> list[Path]:
        """Write the last shard, name the shards and write the index; returns the files."""
        self.flush()
        n = len(self.files)
        if n == 0:
            raise ValueError("no tensors were written")
        if n == 1:
            final = [f"{self.prefix}.safetensors"]
        else:
            final = [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(final):
            os.replace(self.out / self._tmp_name(i), self.out / name)
        if n > 1:
            weight_map = {k: final[i] for i, names in enumerate(self.files) for k in names}
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.out / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        return [self.out / f for f in final]


# ---------------------------------------------------------------------------------------------
# Reading safetensors without mapping the file (bounded RSS for multi-GB single files)


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    from loram.models import check_safetensors

    header = check_safetensors(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n, {k: v for k, v in header.items() if k != "__metadata__"}


def read_safetensors_tensor(f, data_start: int, info: dict, path: Path, name: str) -> torch.Tensor:
    """One tensor of an open safetensors file, read with ``readinto`` (no mmap)."""
    code = info.get("dtype")
    if code not in ST_DTYPES:
        raise ArtifactError(f"{path}: tensor {name} has dtype {code!r}, not supported")
    dtype = ST_DTYPES[code]
    start, end = (int(x) for x in info["data_offsets"])
    shape = [int(s) for s in info["shape"]]
    out = torch.empty(shape, dtype=dtype)
    if end - start != out.numel() * out.element_size():
        raise ArtifactError(f"{path}: tensor {name} has {end - start} bytes for shape {shape}")
    if end > start:
        f.seek(data_start + start)
        view = out.view(-1).view(torch.uint8).numpy()
        if f.readinto(view) != end - start:
            raise ArtifactError(f"{path}: tensor {name} is truncated")
    return out


# ---------------------------------------------------------------------------------------------
# Conversion


@dataclass
class Converted:
    """What a conversion wrote."""

    path: Path
    model_type: str
    params: int
    layers: int
    streamed: bool
    files: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0


def _meta_model(config):
    """The transformers model of ``config`` on the meta device (names, shapes, tying)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from loram.models import _quiet_transformers

    with init_empty_weights(include_buffers=False), _quiet_transformers():
        meta = AutoModelForCausalLM.from_config(config)
    meta.tie_weights()  # transformers 5 ties in from_pretrained (and not inside init_empty_weights)
    return meta


def _tied_names(meta) -> set[str]:
    """State-dict names that ``save_pretrained`` drops because they share another's storage."""
    if not getattr(meta.config, "tie_word_embeddings", False):
        return set()
    out = meta.get_output_embeddings()
    inp = meta.get_input_embeddings()
    if out is None or inp is None:
        return set()
    names = {n for n, m in meta.named_modules() if m is out}
    return {f"{n}.weight" for n in names} if out.weight is inp.weight else set()


def _write_config(meta, dtype: torch.dtype, tmp: Path) -> None:
    cfg = meta.config
    cfg.architectures = [type(meta).__name__]
    cfg.dtype = dtype
    cfg.save_pretrained(tmp)
    if meta.can_generate() and getattr(meta, "generation_config", None) is not None:
        meta.generation_config.save_pretrained(tmp)


def _count(meta) -> int:
    from loram.models import count_params

    return count_params(meta)


def convert_model(
    model: str,
    out_dir: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    shard_bytes: int = SHARD_BYTES,
    stream: bool = True,
    command: str = "base",
) -> Converted:
    """Convert ``model`` (any source :func:`loram.models.resolve_source` accepts) into a plain
    safetensors directory ``out_dir`` (+ tokenizer), atomically; stream when the source allows.
    """
    from loram.models import load_tokenizer, resolve_source, save_end_tokens

    src = resolve_source(model, gguf_file)
    if src.kind == "hub" and stream:
        local = _hub_snapshot(src.path, revision, src.gguf_file)
        if local is not None:
            src = resolve_source(str(local / src.gguf_file) if src.gguf_file else str(local))
    t0 = time.time()
    plan = None
    if stream and src.gguf_file:
        plan = _GGUFPlan.make(Path(src.path) / src.gguf_file)
    elif stream and src.kind == "dir":
        plan = _DirPlan.make(Path(src.path))
    if plan is None:
        return _convert_in_memory(model, gguf_file, dtype, revision, out_dir, shard_bytes, command)
    meta = plan.meta
    log.info("planned %s (peak RSS so far %.0f MiB)", model, peak_rss_mb())
    with atomic_dir(out_dir, command) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        plan.write(writer, dtype)
        files = writer.close()
        log.info("weights written (peak RSS so far %.0f MiB)", peak_rss_mb())
        _write_config(meta, dtype, tmp)
        tok = load_tokenizer(src.path, src.gguf_file)
        tok.save_pretrained(tmp)
        save_end_tokens(tmp, tok)
    res = Converted(
        path=Path(out_dir),
        model_type=meta.config.model_type,
        params=_count(meta),
        layers=int(getattr(meta.config, "num_hidden_layers", 0) or 0),
        streamed=True,
        files=[f.name for f in files],
        peak_rss_mb=round(peak_rss_mb(), 1),
    )
    log.info(
        "converted %s tensor by tensor in %.0f s: %s params, %d shard(s), peak RSS %.0f MiB",
        model,
        time.time() - t0,
        f"{res.params:,}",
        len(files),
        res.peak_rss_mb,
    )
    return res


def _convert_in_memory(model, gguf_file, dtype, revision, out_dir, shard_bytes, command):
    """Load the whole model with transformers and save it (sources the streamer cannot read)."""
    from loram.models import count_params, load_model, save_end_tokens

    log.info("converting %s in memory (the whole model is loaded)", model)
    m, tok = load_model(model, gguf_file, dtype, revision)
    with atomic_dir(out_dir, command) as tmp:
        m.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_bytes)
        tok.save_pretrained(tmp)
        save_end_tokens(tmp, tok)
    return Converted(
        path=Path(out_dir),
        model_type=m.config.model_type,
        params=count_params(m),
        layers=int(getattr(m.config, "num_hidden_layers", 0) or 0),
        streamed=False,
        files=sorted(p.name for p in Path(out_dir).glob("*.safetensors")),
        peak_rss_mb=round(peak_rss_mb(), 1),
    )


def _hub_snapshot(repo: str, revision: str | None, gguf_file: str | None) -> Path | None:
    """A local snapshot of the hub repo's weights, config and tokenizer (None: not possible,
    e.g. no safetensors there; the caller then loads through transformers)."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.model", "*.tiktoken"]
        patterns += [gguf_file] if gguf_file else ["*.safetensors"]
        local = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - the in-memory path reports hub errors clearly
        log.info("no hub snapshot of %s (%s); loading through transformers", repo, exc)
        return None
    if gguf_file and (local / gguf_file).is_file():
        return local
    if not gguf_file and (local / "config.json").is_file():
        return local
    return None


class _DirPlan:
    """A transformers directory of safetensors whose tensors are exactly the model's."""

    def __init__(self, path: Path, meta, files: list[Path]):
        self.path, self.meta, self.files = path, meta, files

    @classmethod
    def make(cls, path: Path) -> _DirPlan | None:
        from loram.models import check_model_dir, load_config, weight_files

        check_model_dir(path)
        files = weight_files(path)
        if not files:
            log.info("%s holds no safetensors; loading it whole", path)
            return None
        meta = _meta_model(load_config(path))
        want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        tied = _tied_names(meta)
        have = {}
        for f in files:
            for k, info in read_safetensors_header(f)[1].items():
                have[k] = tuple(info["shape"])
        stored = {k: v for k, v in have.items() if k not in tied}
        if set(stored) != set(want) - tied or any(want[k] != s for k, s in stored.items()):
            odd = sorted(set(stored) ^ (set(want) - tied))[:3]
            log.info(
                "%s: tensor names/shapes differ from the model's (%s); loading it whole", path, odd
            )
            return None
        return cls(path, meta, files)

    def write(self, writer: ShardWriter, dtype: torch.dtype) -> None:
        from tqdm import tqdm

        tied = _tied_names(self.meta)
        floating = {k for k, v in self.meta.state_dict().items() if v.is_floating_point()}
        for path in self.files:
            start, header = read_safetensors_header(path)
            with open(path, "rb") as f:
                for name in tqdm(sorted(header), desc=f"converting {path.name}", leave=False):
                    if name in tied:
                        continue
                    info = header[name]
                    n = int(np.prod(info["shape"], dtype=np.int64))
                    size = torch.empty(
                        (), dtype=dtype if name in floating else ST_DTYPES.get(info["dtype"], dtype)
                    )
                    writer.make_room(n * size.element_size())
                    t = read_safetensors_tensor(f, start, info, path, name)
                    writer.add(name, t.to(dtype) if name in floating else t)
                    del t


class _GGUFPlan:
    """A GGUF file whose tensors transformers maps one to one (optionally q/k-permuted)."""

    def __init__(self, path: Path, reader, meta, processor, key_map: dict[str, str]):
        self.path, self.reader, self.meta = path, reader, meta
        self.processor, self.key_map = processor, key_map

    @classmethod
    def make(cls, path: Path) -> _GGUFPlan | None:
        from gguf import GGUFReader
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            LlamaTensorProcessor,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        from loram.models import _quiet_transformers

        try:
            reader = GGUFReader(path)
            arch = read_field(reader, "general.architecture")[0]
            with _quiet_transformers():
                config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001 - name the file and the cause
            raise ArtifactError(f"cannot read the GGUF file {path}: {exc}") from None
        proc_cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if proc_cls not in (TensorProcessor, LlamaTensorProcessor):
            log.info("GGUF architecture %s needs whole-model loading (%s)", arch, proc_cls.__name__)
            return None
        meta = _meta_model(config)
        processor = proc_cls(config=config.to_dict())
        key_map = get_gguf_hf_weights_map(meta, processor)
        want = set(meta.state_dict()) - _tied_names(meta)
        got = {key_map[t.name] for t in reader.tensors if t.name in key_map}
        if got != want:
            log.info(
                "%s: GGUF tensors do not cover the model (%s); loading it whole",
                path,
                sorted(want ^ got)[:3],
            )
            return None
        return cls(path, reader, meta, processor, key_map)

    def write(self, writer: ShardWriter, dtype: torch.dtype) -> None:
        from tqdm import tqdm

        tensors = [t for t in self.reader.tensors if t.name in self.key_map]
        with open(self.path, "rb") as f:
            itemsize = torch.empty((), dtype=dtype).element_size()
            for t in tqdm(tensors, desc=f"converting {self.path.name}", leave=False):
                writer.make_room(int(t.n_elements) * itemsize)
                writer.add(self.key_map[t.name], self._tensor(f, t, dtype))

    def _tensor(self, f, t, dtype: torch.dtype) -> torch.Tensor:
        """One GGUF tensor dequantized, processed as transformers does, cast to ``dtype``.

        Raw bytes are read from the file (not the reader's memory map, whose touched pages
        would stay in this process's RSS); rows are dequantized a chunk at a time unless the
        processor transforms the tensor as a whole (Llama's q/k permutation).
        """
        from gguf import dequantize

        raw_shape, raw_dtype = t.data.shape, t.data.dtype

        def rows(lo: int, hi: int) -> np.ndarray:
            row_bytes = int(np.prod(raw_shape[1:], dtype=np.int64)) * raw_dtype.itemsize
            f.seek(int(t.data_offset) + lo * row_bytes)
            buf = np.fromfile(f, dtype=np.uint8, count=(hi - lo) * row_bytes)
            return buf.view(raw_dtype).reshape((hi - lo, *raw_shape[1:]))

        n_rows = raw_shape[0] if len(raw_shape) > 1 else 1
        whole = len(raw_shape) == 1 or (
            type(self.processor).__name__ == "LlamaTensorProcessor"
            and (".attn_k." in t.name or ".attn_q." in t.name)
        )
        if whole:
            if len(raw_shape) == 1:
                f.seek(int(t.data_offset))
                data = np.fromfile(f, dtype=raw_dtype, count=raw_shape[0])
            else:
                data = rows(0, n_rows)
            w = self.processor.process(weights=dequantize(data, t.tensor_type), name=t.name).weights
            return torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
        first = dequantize(rows(0, 1), t.tensor_type)
        out = torch.empty((n_rows, *first.shape[1:]), dtype=dtype)
        per_row = max(1, int(np.prod(first.shape[1:])) * 4)
        step = max(1, CHUNK_BYTES // per_row)
        for lo in range(0, n_rows, step):
            hi = min(n_rows, lo + step)
            out[lo:hi] = torch.from_numpy(dequantize(rows(lo, hi), t.tensor_type)).to(dtype)
        return out


def check_dtype(dtype) -> torch.dtype:
    from loram.models import resolve_dtype

    try:
        return resolve_dtype(dtype)
    except ValueError as exc:
        raise LoramError(str(exc)) from None
