"""Typed, validated parameters: one dataclass per section of ``params.yaml``.

Every section is parsed strictly: an unknown key, a value of the wrong type or a value out of
range raises :class:`ParamsError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loram.evaluate.tasks import CSR_TASKS


class ParamsError(ValueError):
    """A parameter is unknown, mistyped or out of range."""


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ParamsError(f"{key} = {value!r} is not allowed: expected {allowed}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ParamsError as exc:
                errors.append(str(exc))
        allowed = " or ".join("null" if a is type(None) else _describe(a) for a in args)
        _fail(key, value, allowed)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        _fail(key, value, "one of " + ", ".join(repr(a) for a in args))
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            _fail(key, value, f"a list of {_describe(args[0]) if args else 'values'}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "a mapping")
        return {k: _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(key, value, "an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        _fail(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(key, value, "a string")
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def parse_section(cls: type, raw: Any, section: str):
    """Build dataclass ``cls`` from the mapping ``raw``; ``section`` prefixes error messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(section, raw, "a mapping of parameters")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(
            f"{section}.{unknown[0]} is not a known parameter; allowed keys in '{section}': "
            + ", ".join(sorted(names))
        )
    values = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in raw.items()}
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        check(section)
    return obj


def _range(section: str, key: str, value, lo=None, hi=None, lo_open=False, hi_open=False):
    if value is None:
        return
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
        _fail(f"{section}.{key}", value, "a value " + " and ".join(s for s in (lo_s, hi_s) if s))


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class BaseParams:
    """Which base model to start from."""

    model: str = "smollm2-135m"
    """Embedded name (``smollm2-135m``), a hub id, a local HF directory or a ``.gguf`` file."""
    gguf_file: str | None = None
    """GGUF file name inside ``model`` when ``model`` is a directory or hub id of GGUF files."""
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def check(self, s: str) -> None:
        if not self.model.strip():
            _fail(f"{s}.model", self.model, "a model name, hub id, directory or .gguf file")


@dataclass
class SourceParams:
    """One data source: embedded (package-shipped), hub data set or local file."""

    kind: Literal["embedded", "hub", "file"] = "embedded"
    name: str = "math"
    """embedded: a name from ``loram.data.EMBEDDED``; hub: a data set id; file: a path."""
    subset: str | None = None
    split: str = "train"
    format: Literal["auto", "instruction", "text"] = "auto"
    max_rows: int | None = None

    def check(self, s: str) -> None:
        _range(s, "max_rows", self.max_rows, lo=1)


@dataclass
class DataParams:
    train: SourceParams = field(default_factory=SourceParams)
    """Instruction data for LoRA training; a validation split is held out from it."""
    ood: list[SourceParams] = field(
        default_factory=lambda: [SourceParams(kind="embedded", name="gsm8k", split="test")]
    )
    """Out-of-domain instruction data for perplexity only."""
    align: SourceParams = field(
        default_factory=lambda: SourceParams(kind="embedded", name="brown", format="text")
    )
    """General text for the alignment stage."""
    val_fraction: float = 0.1
    max_val_rows: int = 200
    max_ood_rows: int = 200
    seed: int = 0

    def check(self, s: str) -> None:
        _range(s, "val_fraction", self.val_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
        _range(s, "max_val_rows", self.max_val_rows, lo=1)
        _range(s, "max_ood_rows", self.max_ood_rows, lo=1)


@dataclass
class PruneParams:
    method: Literal["structured", "random", "semi", "unstructured"] = "structured"
    ratio: float = 0.65
    """Fraction removed: channels/heads (structured, random) or weights (unstructured)."""
    criterion: Literal["auto", "taylor", "magnitude", "wanda", "sparsegpt"] = "auto"
    """auto = taylor (structured) or wanda (semi / unstructured); random ignores it.
    structured: taylor | magnitude; semi / unstructured: wanda | sparsegpt | magnitude."""
    n: int = 2
    m: int = 4
    """N:M sparsity for ``semi``: at most n non-zeros in every m consecutive inputs."""
    first_layer: int | None = None
    """First pruned decoder layer; null = 4, scaled down for shallow models."""
    last_dense: int | None = None
    """Number of final layers kept dense; null = 2, scaled down for shallow models."""
    calib_samples: int = 16
    calib_seq_len: int = 256
    seed: int = 0

    def check(self, s: str) -> None:
        _range(s, "ratio", self.ratio, lo=0, hi=1, hi_open=True)
        if self.method in ("structured", "random") and self.criterion not in (
            "auto",
            "taylor",
            "magnitude",
        ):
            _fail(f"{s}.criterion", self.criterion, f"taylor or magnitude for method {self.method}")
        if self.method in ("semi", "unstructured") and self.criterion == "taylor":
            _fail(
                f"{s}.criterion", self.criterion, "wanda, sparsegpt or magnitude for sparse methods"
            )
        _range(s, "m", self.m, lo=1)
        _range(s, "n", self.n, lo=1, hi=self.m)
        _range(s, "first_layer", self.first_layer, lo=0)
        _range(s, "last_dense", self.last_dense, lo=0)
        _range(s, "calib_samples", self.calib_samples, lo=1)
        _range(s, "calib_seq_len", self.calib_seq_len, lo=8)

    @property
    def resolved_criterion(self) -> str:
        """The importance criterion actually used."""
        if self.method == "random":
            return "random"
        if self.criterion == "auto":
            return "taylor" if self.method == "structured" else "wanda"
        return self.criterion


@dataclass
class AlignParams:
    enabled: bool = True
    max_steps: int = 30
    lr: float = 5e-5
    warmup_steps: int = 5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    micro_batch: int = 2
    grad_accum: int = 1
    seq_len: int = 256
    weight_decay: float = 0.0
    train_embeddings: bool = False
    save_every: int = 50
    keep_checkpoint: bool = False
    """Keep the last checkpoint after the run completes (false: delete it, saving disk)."""
    max_val_blocks: int = 16
    seed: int = 0

    def check(self, s: str) -> None:
        _range(s, "max_steps", self.max_steps, lo=0)
        _range(s, "lr", self.lr, lo=0, lo_open=True)
        _range(s, "warmup_steps", self.warmup_steps, lo=0)
        for k in ("micro_batch", "grad_accum", "save_every", "max_val_blocks"):
            _range(s, k, getattr(self, k), lo=1)
        _range(s, "seq_len", self.seq_len, lo=8)
        _range(s, "weight_decay", self.weight_decay, lo=0)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainParams:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lm_head: bool = False
    lr: float = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 5
    micro_batch: int = 4
    grad_accum: int = 1
    max_steps: int = 60
    seq_len: int = 256
    save_every: int = 20
    keep_checkpoint: bool = False
    """Keep the last checkpoint after the run completes (false: delete it, saving disk)."""
    eval_every: int = 20
    max_val_rows: int = 32
    """Validation rows scored every ``eval_every`` steps (the rest is for the evaluate stage)."""
    weight_decay: float = 0.0
    quantize: Literal["none", "nf4"] = "none"
    seed: int = 0

    def check(self, s: str) -> None:
        _range(s, "r", self.r, lo=1)
        _range(s, "alpha", self.alpha, lo=0, lo_open=True)
        _range(s, "dropout", self.dropout, lo=0, hi=1, hi_open=True)
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            _fail(f"{s}.targets", self.targets, "a non-empty list from " + ", ".join(LORA_TARGETS))
        _range(s, "lr", self.lr, lo=0, lo_open=True)
        _range(s, "warmup_steps", self.warmup_steps, lo=0)
        for k in (
            "micro_batch",
            "grad_accum",
            "max_steps",
            "save_every",
            "eval_every",
            "max_val_rows",
        ):
            _range(s, k, getattr(self, k), lo=1)
        _range(s, "seq_len", self.seq_len, lo=8)
        _range(s, "weight_decay", self.weight_decay, lo=0)


@dataclass
class RecoverParams:
    norm_a: bool = False
    """Fill pruned columns of lora_A with N(0, 1/r) as the reference's ``normA`` option."""
    mask_update: bool = False
    """Sparse variants: zero B·A wherever the base weight was pruned, so merging keeps sparsity."""
    seed: int = 0


@dataclass
class MergeParams:
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    target: Literal["original", "pruned"] = "original"
    """original: the dense, unpruned model (LoRAM). pruned: the (aligned) sparse pruned model
    itself, semi / unstructured only; with recover.mask_update it stays exactly as sparse."""


# Benchmark names accepted in params: the task modules' own list (light import, no lm-eval).
BENCH_TASKS = ("gsm8k", "mathqa", "csr", *CSR_TASKS, "humaneval")


@dataclass
class EvalParams:
    ppl_max_rows: int = 100
    ppl_seq_len: int = 512
    batch_size: int = 4
    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "csr", "humaneval"])
    """Benchmarks through lm-eval (``csr`` = the six common-sense tasks); [] to skip."""
    source: Literal["local", "hub"] = "local"
    """local: package-shipped data with task configs matching lm-eval's; hub: stock lm-eval tasks."""
    limit: dict[str, int] = field(default_factory=dict)
    """Documents per task (keys: task names or ``csr``); absent = all (the paper setting)."""
    num_fewshot: dict[str, int] = field(default_factory=dict)
    """Shots per task; absent = the paper's (GSM8K 8, MathQA 1, CSR 1, HumanEval 0)."""
    max_gen_toks: int | None = None
    humaneval_n: int = 10
    humaneval_temperature: float = 0.8
    humaneval_top_p: float = 0.95
    seed: int = 0

    def check(self, s: str) -> None:
        _range(s, "ppl_max_rows", self.ppl_max_rows, lo=1)
        _range(s, "ppl_seq_len", self.ppl_seq_len, lo=8)
        _range(s, "batch_size", self.batch_size, lo=1)
        bad = [t for t in self.tasks if t not in BENCH_TASKS]
        if bad:
            _fail(f"{s}.tasks", self.tasks, "a list from " + ", ".join(BENCH_TASKS))
        for k in {**self.limit, **self.num_fewshot}:
            if k not in BENCH_TASKS:
                _fail(f"{s}.limit/num_fewshot key", k, "a task name from " + ", ".join(BENCH_TASKS))
        for k, v in self.limit.items():
            _range(s, f"limit.{k}", v, lo=1)
        for k, v in self.num_fewshot.items():
            _range(s, f"num_fewshot.{k}", v, lo=0)
        _range(s, "max_gen_toks", self.max_gen_toks, lo=1)
        _range(s, "humaneval_n", self.humaneval_n, lo=1)
        _range(s, "humaneval_temperature", self.humaneval_temperature, lo=0)
        _range(s, "humaneval_top_p", self.humaneval_top_p, lo=0, hi=1, lo_open=True)


@dataclass
class VariantParams:
    """One extra arm run in a single stage: overrides of the shared sections.

    kind ``loram``: prune -> align -> train -> recover -> merge -> evaluate with the overrides;
    kind ``lora``: plain LoRA on ``base`` (e.g. a smaller model of the same family).
    """

    kind: Literal["loram", "lora"] = "loram"
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    align: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    recover: dict[str, Any] = field(default_factory=dict)
    merge: dict[str, Any] = field(default_factory=dict)

    def resolved(self, shared: dict[str, Any], name: str) -> dict[str, Any]:
        """The shared sections with this variant's overrides applied (validated)."""
        out = {}
        for sec in ("base", "prune", "align", "train", "recover", "merge"):
            merged = {**to_dict(shared[sec]), **getattr(self, sec)}
            out[sec] = parse_section(SECTIONS[sec], merged, f"variants.{name}.{sec}")
        return out


SECTIONS: dict[str, type] = {
    "base": BaseParams,
    "data": DataParams,
    "prune": PruneParams,
    "align": AlignParams,
    "train": TrainParams,
    "recover": RecoverParams,
    "merge": MergeParams,
    "eval": EvalParams,
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
    """Read ``params.yaml`` and parse the named sections (all known ones by default).

    Returns a dict section -> dataclass. Sections that are absent get their defaults; a
    top-level key that is not a known section is an error.
    """
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"params file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"params file {str(path)!r} must be a mapping of sections")
    return parse_params(raw, sections)


def parse_params(raw: dict, sections: typing.Iterable[str] | None = None) -> dict[str, Any]:
    extra = sorted(
        k for k in raw if k not in SECTIONS and k != "variants" and not k.startswith("_")
    )
    if extra:
        raise ParamsError(
            f"{extra[0]} is not a known params section; allowed: " + ", ".join(SECTIONS)
        )
    names = list(SECTIONS) if sections is None else list(sections)
    want_variants = "variants" in names
    names = [n for n in names if n != "variants"]
    out = {n: parse_section(SECTIONS[n], raw.get(n), n) for n in names}
    if want_variants or sections is None:
        shared = {n: out.get(n) or parse_section(SECTIONS[n], raw.get(n), n) for n in SECTIONS}
        out["variants"] = parse_variants(raw.get("variants"), shared)
    return out


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
