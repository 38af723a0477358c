"""Typed, validated parameters: one pydantic model per section of ``params.yaml``.

``params.yaml`` is the single source of defaults: every key the code reads is listed there and
every default below equals it (``tests/test_config.py`` checks both). Every section is parsed
strictly: an unknown key, a value of the wrong type or a value out of range raises
:class:`ParamsError` naming the dotted key, the bad value and what is allowed, one line per error.
Ints are accepted for floats; bools are not numbers; strings are never coerced to numbers.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from loram.benchmarks import BENCH_TASKS


class ParamsError(ValueError):
    """A parameter is unknown, mistyped or out of range."""


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ParamsError(f"{key} = {value!r} is not allowed: expected {allowed}")


def _bad(field: str, value: Any, allowed: str) -> PydanticCustomError:
    """A cross-field error raised from a model validator; reported as ``section.field = value``."""
    return PydanticCustomError(
        "params_value",
        "{field} = {value} is not allowed: expected {allowed}",
        {"field": field, "value": value, "allowed": allowed},
    )


class _Params(BaseModel):
    """Strict: unknown keys are errors, no str -> number or bool -> int coercion (int -> float is
    allowed), no inf / nan, and defaults are validated like given values."""

    model_config = ConfigDict(
        extra="forbid", strict=True, validate_default=True, allow_inf_nan=False
    )


# --------------------------------------------------------------------------------------------
# pydantic ValidationError -> one line per error: "key = value is not allowed: expected ..."

_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def _dotted(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _flat_meta(items) -> list:
    out = []
    for m in items:
        out.extend(_flat_meta(m.metadata) if isinstance(m, FieldInfo) else [m])
    return out


def _unwrap(tp: Any, meta: list) -> tuple[Any, bool]:
    """Strip ``Annotated`` (collecting constraints into ``meta``) and ``| None``."""
    optional = False
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp = args[0]
            meta.extend(_flat_meta(args[1:]))
        elif origin in (typing.Union, types.UnionType) and type(None) in args:
            optional = True
            rest = tuple(a for a in args if a is not type(None))
            tp = rest[0] if len(rest) == 1 else typing.Union[rest]  # noqa: UP007
        else:
            return tp, optional


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _at(cls: type, loc: tuple) -> tuple[Any, list, bool]:
    """The annotation, constraints and optionality at error location ``loc`` inside ``cls``."""
    tp, meta, optional = cls, [], False
    for part in loc:
        origin = typing.get_origin(tp)
        if _is_model(tp) and part in tp.model_fields:
            f = tp.model_fields[part]
            meta = _flat_meta(f.metadata)
            tp, optional = _unwrap(f.annotation, meta)
        elif origin in (list, tuple) and isinstance(part, int):
            meta = []
            tp, optional = _unwrap(typing.get_args(tp)[0], meta)
        elif origin is dict:
            key_tp, value_tp = typing.get_args(tp)
            meta = []
            tp, optional = _unwrap(key_tp if part == "[key]" else value_tp, meta)
        else:
            return Any, [], False
    return tp, meta, optional


def _choices(tp: Any) -> str:
    return ", ".join(repr(a) for a in typing.get_args(tp))


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + _choices(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        item, _ = _unwrap(item, [])
        if typing.get_origin(item) is Literal:
            return "a list from " + _choices(item)
        return "a list of values" if item is Any else f"a list of {_describe(item)}s"
    if origin is dict or tp is dict:
        return "a mapping"
    if _is_model(tp):
        return "a mapping of parameters"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, "any value"
    )


def _num(x: Any) -> Any:
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _range_text(meta: list) -> str:
    bounds = [
        f"{sym} {_num(getattr(m, attr))}"
        for kind, attr, sym in _BOUNDS
        for m in meta
        if isinstance(m, kind)
    ]
    return "a value " + " and ".join(bounds)


def _message(cls: type, prefix: str, err: dict) -> str:
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = _dotted(prefix, loc[:-1])
        model, _, _ = _at(cls, loc[:-1])
        names = ", ".join(sorted(model.model_fields)) if _is_model(model) else "?"
        return (
            f"{_dotted(prefix, loc)} is not a known parameter; allowed keys in '{parent}': {names}"
        )
    if kind == "params_value":
        ctx = err["ctx"]
        key = _dotted(prefix, (*loc, ctx["field"]))
        return f"{key} = {ctx['value']!r} is not allowed: expected {ctx['allowed']}"
    if loc[-1:] == ("[key]",):  # a mapping key: loc is (..., mapping, key, "[key]")
        tp, meta, optional = _at(cls, (*loc[:-2], "[key]"))
        key = _dotted(prefix, loc[:-2]) + " key"
    else:
        tp, meta, optional = _at(cls, loc)
        key = _dotted(prefix, loc)
    if kind in _RANGE:
        allowed = _range_text(meta)
    elif kind == "finite_number":
        allowed = "a finite number"
    elif kind == "too_short" and err.get("ctx", {}).get("min_length") == 1:
        allowed = _describe(tp).replace("a list", "a non-empty list", 1)
    elif kind in ("too_short", "too_long"):
        allowed = f"{_describe(tp)} ({err['msg'].lower()})"
    elif tp is Any:
        allowed = err["msg"]
    else:
        allowed = _describe(tp) + (" or null" if optional else "")
    return f"{key} = {value!r} is not allowed: expected {allowed}"


def _params_error(exc: ValidationError, cls: type, prefix: str) -> ParamsError:
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    lines = dict.fromkeys(_message(cls, prefix, e) for e in errors)
    return ParamsError("\n".join(lines))


def parse_section(cls: type, raw: Any, section: str):
    """Validate the mapping ``raw`` into model ``cls``; ``section`` prefixes error messages.

    ``None`` (an empty YAML section) means all defaults.
    """
    try:
        return cls.model_validate({} if raw is None else raw)
    except ValidationError as exc:
        raise _params_error(exc, cls, section) from None


def _check_range(field: str, value, lo=None, hi=None) -> None:
    """``lo <= value <= hi`` for a bound that depends on another field."""
    if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        bounds = [s for s in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if s]
        raise _bad(field, value, "a value " + " and ".join(bounds))


# --------------------------------------------------------------------------------------------
# Sections

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
Schedule = Literal["cosine", "linear", "constant"]


class BaseParams(_Params):
    """Which base model to start from."""

    model: str = Field(
        "smollm2-135m",
        description="Embedded name (``smollm2-135m``), a hub id, a local HF directory or a "
        "``.gguf`` file.",
    )
    gguf_file: str | None = Field(
        None,
        description="GGUF file name inside ``model`` when ``model`` is a directory or hub id of "
        "GGUF files.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Dtype = Field(
        "float32",
        description="dtype of every saved artifact and stage (fp32 kept where needed); auto = "
        "bfloat16 on a GPU that supports it or a CPU with AMX / AVX512-BF16, float32 otherwise "
        "(bf16 matmuls are emulated and far slower than fp32 on other CPUs).",
    )

    @model_validator(mode="after")
    def _check(self):
        if not self.model.strip():
            raise _bad("model", self.model, "a model name, hub id, directory or .gguf file")
        return self


class SourceParams(_Params):
    """One data source: embedded (package-shipped), hub data set or local file.

    The defaults are those of ``data.train`` in ``params.yaml``.
    """

    kind: Literal["embedded", "hub", "file"] = "embedded"
    name: str = Field(
        "mbpp",
        description="embedded: a name from ``loram.data.EMBEDDED``; hub: a data set id; "
        "file: a path.",
    )
    subset: str | None = Field(None, description="Hub data set configuration (subset).")
    split: str = "train"
    format: Literal["auto", "instruction", "text"] = "auto"
    max_rows: int | None = Field(None, ge=1, description="At most this many rows; null = all.")


class DataParams(_Params):
    train: SourceParams = Field(
        default_factory=lambda: SourceParams(kind="embedded", name="mbpp"),
        description="Instruction data for LoRA training; a validation split is held out from it.",
    )
    ood: list[SourceParams] = Field(
        default_factory=lambda: [SourceParams(kind="embedded", name="gsm8k", split="test")],
        description="Out-of-domain instruction data for perplexity only.",
    )
    align: SourceParams = Field(
        default_factory=lambda: SourceParams(kind="embedded", name="brown", format="text"),
        description="General text for the alignment stage.",
    )
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_val_rows: int = Field(200, ge=1)
    max_ood_rows: int = Field(200, ge=1)
    seed: int = 0


class PruneParams(_Params):
    method: Literal["structured", "random", "semi", "unstructured"] = "structured"
    ratio: float = Field(
        0.65,
        ge=0,
        lt=1,
        description="Fraction removed: channels/heads (structured, random) or weights "
        "(unstructured).",
    )
    criterion: Literal["auto", "taylor", "magnitude", "wanda", "sparsegpt"] = Field(
        "auto",
        description="auto = taylor (structured) or wanda (semi / unstructured); random ignores "
        "it. structured: taylor | magnitude; semi / unstructured: wanda | sparsegpt | magnitude.",
    )
    round_to: int = Field(
        8,
        ge=1,
        description="structured / random: the kept MLP channels of a layer are rounded to the "
        "nearest multiple of this (1 = the ratio's exact count). Matrix products over a "
        "multiple of 8 run at full speed; 537 channels (1,536 at 0.65) cost up to 40% more "
        "per FLOP on a CPU, and GPU tensor cores want multiples of 8 too.",
    )
    n: int = Field(2, ge=1)
    m: int = Field(
        4,
        ge=1,
        description="N:M sparsity for ``semi``: at most n non-zeros in every m consecutive inputs.",
    )
    first_layer: int | None = Field(
        None,
        ge=0,
        description="First pruned decoder layer; null = 4, scaled down for shallow models.",
    )
    last_dense: int | None = Field(
        None,
        ge=0,
        description="Number of final layers kept dense; null = 2, scaled down for shallow models.",
    )
    calib_samples: int = Field(16, ge=1)
    calib_seq_len: int = Field(256, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.method in ("structured", "random") and self.criterion not in (
            "auto",
            "taylor",
            "magnitude",
        ):
            raise _bad("criterion", self.criterion, f"taylor or magnitude for method {self.method}")
        if self.method in ("semi", "unstructured") and self.criterion == "taylor":
            raise _bad(
                "criterion", self.criterion, "wanda, sparsegpt or magnitude for sparse methods"
            )
        _check_range("n", self.n, lo=1, hi=self.m)
        return self

    @property
    def resolved_criterion(self) -> str:
        """The importance criterion actually used."""
        if self.method == "random":
            return "random"
        if self.criterion == "auto":
            return "taylor" if self.method == "structured" else "wanda"
        return self.criterion


_KEEP = "Keep the last checkpoint after the run completes (false: delete it, saving disk)."
_PROCESSES = (
    "Data-parallel processes the stage starts itself (one per GPU; gloo on CPU). The global "
    "batch stays micro_batch x grad_accum and is dealt in whole micro-batches: grad_accum must "
    "be a multiple of it."
)
_SHARDING = "none: every process holds the whole model (DDP) | fsdp: FSDP2, decoder layers sharded."
_PRECISION = "auto: bf16 autocast on a GPU with bf16, else fp32 | fp32 | bf16 (autocast)."
Sharding = Literal["none", "fsdp"]
Precision = Literal["auto", "fp32", "bf16"]

# Training-cost options shared by alignment and LoRA training (benchmarks/train_cost.py measures
# each; README "Training cost").
_LOSS_CHUNK = (
    "Tokens per chunk of the vocabulary projection + cross-entropy, each chunk checkpointed so "
    "the full fp32 logits of a batch never exist (0: the stock loss over the full logits)."
)
_LOSS_FUSED = (
    "With loss_chunk: where lm_head is a frozen plain linear layer, each chunk's gradient is taken "
    "in the forward pass (one fewer vocabulary projection per token than recomputing the chunk "
    "in the backward pass, same memory); false: checkpoint and recompute every chunk."
)
_GRAD_CKPT = (
    "Activation checkpointing of the decoder layers (non-reentrant): the backward pass "
    "recomputes each layer's forward instead of keeping its activations."
)
_ATTN = (
    "Attention kernel: sdpa (torch scaled_dot_product_attention; fused kernels that keep no "
    "score matrix when they apply) or eager (materialises every layer's score matrices)."
)
_HEAP = (
    "CPU, glibc: allocations of at least this many bytes get memory maps of their own, returned "
    "to the system when freed, so the resident memory follows the live tensors (0: glibc's "
    "dynamic threshold, which rises to 32 MiB and keeps freed activations in the heap)."
)
_BLOCK_CACHE = (
    "CPU: tensors of at least heap_mmap_threshold bytes come from loram's block cache (a torch "
    "CPU allocator that keeps freed blocks for the next tensor of their size class and unmaps "
    "idle blocks before it maps new ones): the resident memory of the bounded heap without a "
    "page fault per fresh tensor page. Compiled once per torch version (C++ compiler); where it "
    "cannot be built, a warning and the bounded heap alone. No effect with heap_mmap_threshold "
    "0 or on a GPU."
)
_OPTIMIZER = (
    "AdamW's implementation: auto (torch's fused kernel, one pass per step over every tensor, "
    "where it runs: one process or DDP on a CPU or CUDA device; torch's default, foreach, under "
    "FSDP), fused, foreach (a few passes per step over all tensors at once) or for_loop (one "
    "tensor at a time). The same update up to rounding."
)
Optimizer = Literal["auto", "fused", "foreach", "for_loop"]
AttnImplementation = Literal["sdpa", "eager"]
LOSS_CHUNK_DEFAULT = 256
# On: glibc's dynamic threshold keeps the freed activations of every step resident (SmolLM2-135M,
# 4 x 512, checkpointing: 2.8 GiB of heap above the weights against 0.3 GiB of live tensors);
# benchmarks/train_cost.py --also glibc_heap measures both ways (README "Training cost").
HEAP_MMAP_THRESHOLD_DEFAULT = 131072
# Off by default: on CPU at the default scale it doubles training time; GPU profiles turn it on.
GRAD_CKPT_DEFAULT = False


class EngineParams(_Params):
    """How a training loop runs (alignment and LoRA training share these): processes, sharding,
    precision and the memory options that benchmarks/train_cost.py measures."""

    processes: int = Field(1, ge=1, description=_PROCESSES)
    sharding: Sharding = Field("none", description=_SHARDING)
    precision: Precision = Field("auto", description=_PRECISION)
    loss_chunk: int = Field(LOSS_CHUNK_DEFAULT, ge=0, description=_LOSS_CHUNK)
    loss_fused: bool = Field(True, description=_LOSS_FUSED)
    grad_checkpointing: bool = Field(GRAD_CKPT_DEFAULT, description=_GRAD_CKPT)
    attn_implementation: AttnImplementation = Field("sdpa", description=_ATTN)
    heap_mmap_threshold: int = Field(HEAP_MMAP_THRESHOLD_DEFAULT, ge=0, description=_HEAP)
    block_cache: bool = Field(True, description=_BLOCK_CACHE)
    optimizer: Optimizer = Field("auto", description=_OPTIMIZER)


class AlignParams(EngineParams):
    enabled: bool = True
    # 102,400 tokens: the dose-response at Stru 0.85 (profiles/alignment.yaml) reached 93% of its
    # merged in-domain gain by 102k tokens and little more at 410k (README "When does alignment pay?").
    max_steps: int = Field(100, ge=0)
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Schedule = "cosine"
    micro_batch: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=8)
    weight_decay: float = Field(0.0, ge=0)
    train_embeddings: bool = Field(
        False,
        description="Also train the input embeddings (never when tied to lm_head; lm_head is "
        "never trained).",
    )
    save_every: int = Field(25, ge=1)
    max_grad_norm: float = Field(
        1.0, ge=0, description="clip the gradient norm of each step to this (0: no clipping)"
    )
    keep_checkpoint: bool = Field(False, description=_KEEP)
    max_val_blocks: int = Field(
        16, ge=1, description="Held-out ``seq_len`` blocks for the validation loss."
    )
    seed: int = 0


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LoraTarget = Literal[LORA_TARGETS]


class TrainParams(EngineParams):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[LoraTarget] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    lm_head: bool = False
    lr: float = Field(3e-4, gt=0)
    schedule: Schedule = "cosine"
    warmup_steps: int = Field(5, ge=0)
    micro_batch: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(40, ge=1)
    seq_len: int = Field(256, ge=8)
    save_every: int = Field(10, ge=1)
    max_grad_norm: float = Field(
        1.0, ge=0, description="clip the gradient norm of each step to this (0: no clipping)"
    )
    keep_checkpoint: bool = Field(False, description=_KEEP)
    eval_every: int = Field(20, ge=1)
    max_val_rows: int = Field(
        32,
        ge=1,
        description="Validation rows scored every ``eval_every`` steps (the rest is for the "
        "evaluate stage).",
    )
    weight_decay: float = Field(0.0, ge=0)
    dropout_rng: Literal["torch", "packed"] = Field(
        "packed",
        description="LoRA dropout masks on CPU: packed (four 16-bit uniforms per 64-bit draw, "
        "a 1-byte mask kept for the backward pass; loram.train.PackedDropout: the same keep "
        "rate and expectation, other masks) or torch (nn.Dropout: one draw per element, a "
        "4-byte mask kept). GPUs always use torch's.",
    )
    quantize: Literal["none", "nf4"] = Field("none", description="nf4: QLoRAM (NF4 base).")
    packing: bool = Field(
        False,
        description="Pack each micro-batch's examples into as few rows of at most ``seq_len`` "
        "tokens as fit, each example its own sequence (positions restart, attention never "
        "crosses examples): the same loss with fewer padded positions computed.",
    )
    seed: int = 0


class RecoverParams(_Params):
    norm_a: bool = Field(
        False,
        description="Fill pruned columns of lora_A with N(0, 1/r) as the reference's ``normA`` "
        "option.",
    )
    mask_update: bool = Field(
        False,
        description="Sparse variants: zero B·A wherever the base weight was pruned, so merging "
        "keeps sparsity.",
    )
    seed: int = 0


class MergeParams(_Params):
    dtype: Dtype = Field(
        "auto",
        description="dtype of the merged model; auto = the merge target's (the base stage's).",
    )
    target: Literal["original", "pruned"] = Field(
        "original",
        description="original: the dense, unpruned model (LoRAM). pruned: the (aligned) sparse "
        "pruned model itself, semi / unstructured only; with recover.mask_update it stays "
        "exactly as sparse.",
    )


# Benchmark names accepted in params: the task modules' own list (light import, no lm-eval).
BenchTask = Literal[BENCH_TASKS]
DEFAULT_EVAL_LIMIT = {"gsm8k": 5, "csr": 50, "humaneval": 3}


class MathQAParams(_Params):
    """MathQA offline: no package ships it."""

    path: str | None = Field(
        None,
        description="A JSON / JSONL copy of the stock MathQA test split (regisss/math_qa rows: "
        "Problem, options, correct, ...); null: MathQA runs only with source: hub.",
    )


class EvalParams(_Params):
    ppl_max_rows: int = Field(30, ge=1)
    ppl_seq_len: int = Field(384, ge=8)
    batch_size: int = Field(4, ge=1)
    gen_batch_size: int | None = Field(
        None,
        ge=1,
        description="Prompts decoded at once by the generation tasks (GSM8K, HumanEval); null: "
        "batch_size. Each batch decodes until its longest answer ends.",
    )
    tasks: list[BenchTask] = Field(
        default_factory=lambda: ["gsm8k", "csr", "humaneval"],
        description="Benchmarks through lm-eval (``csr`` = the six common-sense tasks); [] to skip.",
    )
    source: Literal["local", "hub"] = Field(
        "local",
        description="local: package-shipped data with task configs matching lm-eval's; hub: "
        "stock lm-eval tasks.",
    )
    limit: dict[BenchTask, Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: dict(DEFAULT_EVAL_LIMIT),
        description="Documents per task (keys: task names or ``csr``); absent = all (the paper "
        "setting). The default keeps the CSR mean's standard error <= 3 points on CPU.",
    )
    num_fewshot: dict[BenchTask, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Shots per task; absent = the paper's (GSM8K 8, MathQA 1, CSR 1, HumanEval 0).",
    )
    max_gen_toks: int | None = Field(
        None,
        ge=1,
        description="Generation length cap for every generative benchmark; null = each task's "
        "own (stock: GSM8K 256, HumanEval 1024).",
    )
    humaneval_n: int = Field(
        1, ge=1, description="Completions per problem (pass@k for k <= n; the paper: 10)."
    )
    humaneval_temperature: float = Field(
        0.0, ge=0, description="0: greedy (stock pass@1); > 0: sampling (pass@10 needs n >= 10)."
    )
    humaneval_top_p: float = Field(0.95, gt=0, le=1)
    sandbox: Literal["strict", "rlimits"] = Field(
        "strict",
        description="strict: run model-written code only with namespace isolation (root "
        "namespaces, else a user namespace), else stop with an error; rlimits: accept the "
        "weaker rlimits-only sandbox (no network / filesystem isolation) knowingly.",
    )
    mathqa: MathQAParams = Field(default_factory=MathQAParams)
    seed: int = Field(
        1234, description="Few-shot sampler, numpy and torch seed (lm-eval's default 1234)."
    )


class BaselinesParams(_Params):
    """Reference arms beside ``arms`` and ``variants``."""

    lora_full: bool | Literal["auto"] = Field(
        True,
        description="LoRA on the full original model (stages train_lora_full, merge_lora_full, "
        "evaluate@lora_full). false: those stages record that it was not run and the report "
        "leaves the arm out; auto: run it unless the base is float32 and training runs on the "
        "CPU (dtype auto on a CPU without bf16 matmuls in hardware, where training and "
        "evaluating the full model cost as much as the rest of a run). Read by "
        "train_lora_full only; changing it retrains no other arm.",
    )


class VariantParams(_Params):
    """A baseline on another model, run in one stage (``variant@NAME``): plain LoRA on ``base``
    (e.g. a smaller model of the same family) -> merge -> evaluate, with these overrides; or
    (``kind: original``) that model evaluated without fine-tuning."""

    kind: Literal["lora", "original"] = Field(
        "lora",
        description="lora: plain LoRA on another model; original: that model evaluated untuned. "
        "LoRAM arms are ``bases`` + ``arms``, which share their pruned and aligned bases (DVC "
        "stages of their own).",
    )
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    prune: dict[str, Any] = Field(default_factory=dict)
    align: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    recover: dict[str, Any] = Field(default_factory=dict)
    merge: dict[str, Any] = Field(default_factory=dict)

    def resolved(self, shared: dict[str, Any], name: str) -> dict[str, Any]:
        """The shared sections with this variant's overrides applied (validated)."""
        out = {}
        for sec in ("base", "prune", "align", "train", "recover", "merge"):
            merged = {**to_dict(shared[sec]), **getattr(self, sec)}
            out[sec] = parse_section(SECTIONS[sec], merged, f"variants.{name}.{sec}")
        return out


class BaseSpec(_Params):
    """One pruned + aligned base (``bases.NAME``): pruned and aligned once, shared by every arm
    that names it. Overrides of the ``prune`` and ``align`` sections."""

    description: str = ""
    prune: dict[str, Any] = Field(default_factory=dict)
    align: dict[str, Any] = Field(default_factory=dict)


class ArmSpec(_Params):
    """One LoRAM fine-tune (``arms.NAME``): LoRA trained on ``bases.<base>``, recovered, merged
    into the original model and evaluated. Overrides of ``train``, ``recover`` and ``merge``."""

    base: str = Field(description="the name of an entry of ``bases``")
    description: str = ""
    train: dict[str, Any] = Field(default_factory=dict)
    recover: dict[str, Any] = Field(default_factory=dict)
    merge: dict[str, Any] = Field(default_factory=dict)


class NoAlignSpec(_Params):
    """An ablation arm (``ablations.noalign.NAME``): LoRA trained on ``bases.<base>``'s pruned
    model before alignment (the shared ``train`` section), recovered, merged and evaluated."""

    base: str = Field(description="the name of an entry of ``bases``")
    description: str = Field(description="the report's label for the arm (required)")


class NoRecoverySpec(_Params):
    """An ablation (``ablations.no_recovery.NAME``): ``arms.<arm>``'s aligned pruned base with
    its adapter as trained, no recovery, no merge. ``base`` repeats the arm's base (DVC cannot
    look it up) and must equal it."""

    arm: str = Field(description="the name of an entry of ``arms``")
    base: str = Field(description="that arm's ``base``")
    description: str = Field(description="the report's label for the arm (required)")


class AblationsParams(_Params):
    """Ablation arms, one set of DVC stages each; empty mappings run none."""

    noalign: dict[str, NoAlignSpec] = Field(default_factory=dict)
    no_recovery: dict[str, NoRecoverySpec] = Field(default_factory=dict)


def parse_ablations(raw: dict) -> AblationsParams:
    """``raw["ablations"]``, validated against ``bases``, ``arms`` and ``variants``: names are
    new arm names, bases and arms exist, a no-recovery entry names its arm's base."""
    ab = parse_section(AblationsParams, raw.get("ablations"), "ablations")
    bases, arms = _named(raw, "bases"), _named(raw, "arms")
    taken = {"original", "lora_full", *arms, *(raw.get("variants") or {})}
    for kind, entries in (("noalign", ab.noalign), ("no_recovery", ab.no_recovery)):
        for name, spec in entries.items():
            where = f"ablations.{kind}.{name}"
            _check_stage_name(f"{where} name", name)
            if name in taken:
                _fail(f"ablations.{kind}", name, "a name no arm, variant or other ablation has")
            taken.add(name)
            if kind == "no_recovery":
                if spec.arm not in arms:
                    _fail(
                        f"{where}.arm", spec.arm, "the name of an entry of arms: " + ", ".join(arms)
                    )
                arm_base = (arms[spec.arm] or {}).get("base")
                if spec.base != arm_base:
                    _fail(f"{where}.base", spec.base, f"the base of arms.{spec.arm}: {arm_base}")
            elif spec.base not in bases:
                _fail(
                    f"{where}.base", spec.base, "the name of an entry of bases: " + ", ".join(bases)
                )
    return ab


NAMED: dict[str, tuple[type[_Params], tuple[str, ...]]] = {
    "bases": (BaseSpec, ("prune", "align")),
    "arms": (ArmSpec, ("train", "recover", "merge")),
}
"""Top-level maps of named entries, the model of an entry and the sections it may override."""


SECTIONS: dict[str, type[_Params]] = {
    "base": BaseParams,
    "data": DataParams,
    "prune": PruneParams,
    "align": AlignParams,
    "train": TrainParams,
    "recover": RecoverParams,
    "merge": MergeParams,
    "eval": EvalParams,
    "baselines": BaselinesParams,
}


def parse_variants(raw: Any, shared: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Parse the ``variants`` mapping (name -> VariantParams) and resolve each against ``shared``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        _fail("variants", raw, "a mapping of variant name -> overrides")
    out = {}
    for name, spec in raw.items():
        v = parse_section(VariantParams, spec, f"variants.{name}")
        out[name] = {"spec": v, **v.resolved(shared, name)}
    return out


def load_params(path: str | Path = "params.yaml", sections: typing.Iterable[str] | None = None):
    """Read ``params.yaml`` and parse the named sections (all known ones, plus ``variants``,
    ``bases`` and ``arms``, by default).

    Returns a dict section -> model. Sections that are absent get their defaults; a
    top-level key that is not a known section is an error.
    """
    return parse_params(load_raw(path), sections)


def parse_params(raw: dict, sections: typing.Iterable[str] | None = None) -> dict[str, Any]:
    extra = sorted(
        k
        for k in raw
        if k not in SECTIONS
        and k not in NAMED
        and k not in ("variants", "ablations")
        and not k.startswith("_")
    )
    if extra:
        raise ParamsError(
            f"{extra[0]} is not a known params section; allowed: "
            + ", ".join([*SECTIONS, *NAMED, "variants", "ablations"])
        )
    names = list(SECTIONS) if sections is None else list(sections)
    want_variants = "variants" in names
    names = [n for n in names if n != "variants"]
    out = {n: parse_section(SECTIONS[n], raw.get(n), n) for n in names}
    if want_variants or sections is None:
        shared = {n: out.get(n) or parse_section(SECTIONS[n], raw.get(n), n) for n in SECTIONS}
        out["variants"] = parse_variants(raw.get("variants"), shared)
    if sections is None:
        for kind in NAMED:
            out[kind] = {name: resolve_named(raw, kind, name) for name in _named(raw, kind)}
        out["ablations"] = parse_ablations(raw)
    return out


def _named(raw: dict, kind: str) -> dict[str, Any]:
    entries = raw.get(kind)
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        _fail(kind, entries, f"a mapping of name -> {NAMED[kind][0].__name__} overrides")
    for name in entries:
        _check_stage_name(f"{kind} name", name)
    return entries


def _check_stage_name(label: str, name: Any) -> None:
    """An entry name becomes part of a DVC stage name: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        _fail(label, name, "letters, digits, '_' and '-' (it names a DVC stage)")


def resolve_named(raw: dict, kind: str, name: str) -> dict[str, Any]:
    """The sections of ``raw`` with the overrides of ``raw[kind][name]`` applied (validated):
    ``{"spec": BaseSpec | ArmSpec, "prune": PruneParams, ...}``."""
    entries = _named(raw, kind)
    if name not in entries:
        raise ParamsError(
            f"{kind}.{name} is not in the params file; defined: {', '.join(entries) or '(none)'}"
        )
    cls, overridable = NAMED[kind]
    spec = parse_section(cls, entries[name], f"{kind}.{name}")
    if kind == "arms" and spec.base not in _named(raw, "bases"):
        _fail(
            f"arms.{name}.base",
            spec.base,
            "the name of an entry of bases: " + ", ".join(_named(raw, "bases")),
        )
    out: dict[str, Any] = {"spec": spec}
    for sec in overridable:
        shared = parse_section(SECTIONS[sec], raw.get(sec), sec)
        merged = {**to_dict(shared), **getattr(spec, sec)}
        out[sec] = parse_section(SECTIONS[sec], merged, f"{kind}.{name}.{sec}")
    return out


def load_raw(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} does not exist or is not a file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"params file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"params file {str(path)!r} must be a mapping of sections")
    return raw


def load_named(
    path: str | Path, kind: str, name: str, sections: typing.Iterable[str]
) -> dict[str, Any]:
    """``load_params`` for the stage of one named base or arm: its sections with the entry's
    overrides applied (sections it cannot override are the shared ones), plus ``spec``."""
    raw = load_raw(path)
    plain = parse_params(raw, sections)
    named = resolve_named(raw, kind, name)
    return {**plain, **{k: v for k, v in named.items() if k == "spec" or k in plain}}


def to_dict(obj) -> dict:
    return obj.model_dump()
