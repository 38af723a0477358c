"""Memory accountant: parameters and weight memory of an original vs a pruned model.

Everything is computed from a config alone: the model is built on the ``meta`` device (no
weights, no memory) and, for structured/random pruning, the projections of the pruned layers
are replaced by smaller meta ``nn.Linear`` modules, so the count is that of the real pruned
architecture. The paper's rules (``LORAM_METHOD.md``, "Memory accounting"):

* reduction ratio = original parameters / parameters held during training (LoRA ignored);
* HBM = parameters x bytes / 2**30;
* QLoRAM ("nf4", mode ``paper``): every pruned parameter counts as a quarter of a 16-bit one.

The ``bitsandbytes`` NF4 mode instead counts what bitsandbytes stores: every ``nn.Linear``
except ``lm_head`` as packed 4-bit values plus double-quantised block constants; embeddings,
norms, biases and ``lm_head`` in 16 bit.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loram.prune.common import ATTN_PROJ, MLP_PROJ, kept_kv_heads, kept_mlp_channels, pruned_layers

CONFIG_DIR = Path(__file__).with_name("configs")

METHODS = ("structured", "random", "semi", "unstructured", "none")
STRUCTURED = ("structured", "random")
PRECISIONS = ("bf16", "fp16", "fp32", "nf4")
NF4_MODES = ("paper", "bitsandbytes")
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GIB = 2**30

# Default ratio of each method: the paper's settings.
DEFAULT_RATIO = {"structured": 0.65, "random": 0.65, "semi": 0.5, "unstructured": 0.55, "none": 0.0}
NM_GROUP = 4  # M of N:M semi-structured sparsity (ratio 0.5 -> 2:4)

# bitsandbytes NF4 with double quantisation (``bnb_4bit_use_double_quant=True``).
BNB_BLOCK = 64  # weights per absmax constant
BNB_NESTED_BLOCK = 256  # absmax constants per fp32 scale
# Per quantised tensor: nested offset (fp32 scalar), 16-entry NF4 code and 256-entry nested
# code (fp32), as in bitsandbytes' QuantState / its saved state dict.
BNB_TENSOR_CONSTANTS = 4 + 16 * 4 + 256 * 4


@dataclass(frozen=True)
class MemoryReport:
    """One row of the accountant: a model, a pruning setting and a precision."""

    model: str
    method: str
    ratio: float
    precision: str
    nf4_mode: str | None
    original_params: int  # parameters of the unpruned model
    pruned_params: int  # parameters the pruned model stores (zeros included for semi/unst)
    nonzero_params: int  # non-zero parameters among them
    held_params: int  # parameters held by the paper's rule (16-bit equivalent for nf4)
    held_bytes: int  # bytes of the weights held during training
    reduction: float  # original_params / held_params
    gib: float  # held_bytes / 2**30
    layers: list[int] = field(default_factory=list)  # indices of the pruned decoder layers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- configs


def available_configs() -> list[str]:
    """Names of the configs shipped in ``loram/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(spec: Any):
    """A transformers config from a shipped name, a config.json path, a model dir or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(spec, PretrainedConfig):
        return spec
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"config must be a name, a path or a PretrainedConfig, not {type(spec)}")
    text = str(spec).strip()
    name = text.lower().removesuffix(".json")
    if name in available_configs():
        return AutoConfig.from_pretrained(str(CONFIG_DIR / f"{name}.json"))
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    if path.is_file():
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    raise ValueError(
        f"unknown config {text!r}: not a shipped config and no such file or directory; "
        f"available: {', '.join(available_configs())}"
    )


def config_label(spec: Any, config) -> str:
    """A short name for a config in tables."""
    if isinstance(spec, (str, Path)):
        text = str(spec).strip()
        name = text.lower().removesuffix(".json")
        if name in available_configs():
            return name
        path = Path(text)
        return path.parent.name if path.name == "config.json" else path.stem or path.name
    return getattr(config, "name_or_path", "") or getattr(config, "model_type", "model")


# ----------------------------------------------------------------------------- meta models


def meta_model(config) -> nn.Module:
    """The ``*ForCausalLM`` of ``config`` on the meta device (shapes only, no storage)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Llama-family causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: not a Llama-family model")
    return layers


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    with torch.device("meta"):
        return nn.Linear(in_features, out_features, bias=bias)


def shrink_structured(
    model: nn.Module, ratio: float, layers: Iterable[int], round_to: int = 1
) -> None:
    """Replace, in place, the projections of ``layers`` by the smaller ones that structured
    pruning at ``ratio`` leaves (kept KV heads with their query groups, kept MLP channels, their
    count rounded to a multiple of ``round_to``)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    group = heads // kv
    kept_kv = kept_kv_heads(kv, ratio)
    for i in layers:
        attn = decoder_layers(model)[i].self_attn
        mlp = decoder_layers(model)[i].mlp
        q, k, v, o = (getattr(attn, p) for p in ATTN_PROJ)
        head_dim = k.out_features // kv
        q_out, kv_out = kept_kv * group * head_dim, kept_kv * head_dim
        attn.q_proj = _linear(q.in_features, q_out, q.bias is not None)
        attn.k_proj = _linear(k.in_features, kv_out, k.bias is not None)
        attn.v_proj = _linear(v.in_features, kv_out, v.bias is not None)
        attn.o_proj = _linear(q_out, o.out_features, o.bias is not None)
        gate, up, down = (getattr(mlp, p) for p in MLP_PROJ)
        kept = kept_mlp_channels(gate.out_features, ratio, round_to)
        mlp.gate_proj = _linear(gate.in_features, kept, gate.bias is not None)
        mlp.up_proj = _linear(up.in_features, kept, up.bias is not None)
        mlp.down_proj = _linear(kept, down.out_features, down.bias is not None)


def count_params(model: nn.Module) -> int:
    """Number of parameters (tied ones once)."""
    return sum(p.numel() for p in model.parameters())


def _zeros_per_weight(weight_shape: torch.Size, method: str, ratio: float) -> int:
    """Zeros that semi (N:M along the input dim) or unstructured pruning puts in a weight.

    Unstructured: ``round(numel * ratio)`` (half up) per matrix, the pruners' target.
    """
    rows, cols = weight_shape
    if method == "unstructured":
        return math.floor(round(rows * cols * ratio, 9) + 0.5)
    n = round(ratio * NM_GROUP)
    groups, rest = divmod(cols, NM_GROUP)
    return rows * (groups * n + min(n, rest))


def _check_method_ratio(method: str, ratio: float) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio = {ratio!r} is not allowed: expected 0 <= ratio < 1")
    if method == "semi" and abs(ratio * NM_GROUP - round(ratio * NM_GROUP)) > 1e-9:
        raise ValueError(
            f"semi-structured ratio {ratio} is not N:{NM_GROUP} sparsity; "
            f"use a multiple of 1/{NM_GROUP} (0.5 is 2:4)"
        )


def pruned_meta_model(
    config,
    method: str = "structured",
    ratio: float = 0.65,
    first_layer: int | None = None,
    last_dense: int | None = None,
    round_to: int = 1,
) -> tuple[nn.Module, list[int]]:
    """The meta model that pruning ``config`` holds in memory, and the pruned layer indices.

    Structured and random pruning give smaller projections (``round_to``: see
    :func:`loram.prune.common.kept_mlp_channels`); semi and unstructured pruning keep the dense
    shapes (zeros are stored); ``none`` is the original model.
    """
    _check_method_ratio(method, ratio)
    model = meta_model(config)
    if method == "none":
        return model, []
    layers = pruned_layers(config.num_hidden_layers, first_layer, last_dense)
    if method in STRUCTURED:
        shrink_structured(model, ratio, layers, round_to)
    return model, layers


def _nonzero(model: nn.Module, method: str, ratio: float, layers: Sequence[int]) -> int:
    total = count_params(model)
    if method not in ("semi", "unstructured"):
        return total
    for i in layers:
        layer = decoder_layers(model)[i]
        for proj in ATTN_PROJ + MLP_PROJ:
            block = layer.self_attn if proj in ATTN_PROJ else layer.mlp
            total -= _zeros_per_weight(getattr(block, proj).weight.shape, method, ratio)
    return total


def bnb_nf4_bytes(model: nn.Module) -> int:
    """Bytes bitsandbytes NF4 with double quantisation holds for ``model``'s weights.

    Every ``nn.Linear`` but ``lm_head`` (and a head tied to the embeddings) is quantised:
    ``ceil(n/2)`` bytes of packed 4-bit values, one uint8 absmax per 64 weights, one fp32
    scale per 256 absmax values and a few per-tensor constants. Everything else (embeddings,
    norms, biases, ``lm_head``) stays in 16 bit.
    """
    quantised: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        w = module.weight
        if id(w) in quantised:
            continue
        quantised.add(id(w))
        n = w.numel()
        blocks = math.ceil(n / BNB_BLOCK)
        nested = math.ceil(blocks / BNB_NESTED_BLOCK)
        total += math.ceil(n / 2) + blocks + 4 * nested + BNB_TENSOR_CONSTANTS
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in quantised and id(p) not in seen:
            seen.add(id(p))
            total += 2 * p.numel()
    return total


# ----------------------------------------------------------------------------- accounting


def memory_report(
    config: Any,
    method: str = "structured",
    ratio: float | None = None,
    precision: str = "bf16",
    nf4_mode: str = "paper",
    first_layer: int | None = None,
    last_dense: int | None = None,
    name: str | None = None,
) -> MemoryReport:
    """Parameters and weight memory of ``config`` pruned by ``method`` at ``ratio``.

    ``config`` is a shipped name (``llama-2-13b``), a config.json path, a local model dir or a
    ``PretrainedConfig``. For ``nf4`` the held parameters are 16-bit equivalents (bytes / 2),
    so the reduction compares with the 16-bit original, as the paper does for QLoRAM.
    """
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
        )
    if precision == "nf4" and nf4_mode not in NF4_MODES:
        raise ValueError(f"unknown nf4 mode {nf4_mode!r}; expected one of {', '.join(NF4_MODES)}")
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    ratio = DEFAULT_RATIO[method] if ratio is None else float(ratio)
    if method == "none":
        ratio = 0.0
    cfg = load_config(config)
    label = name or config_label(config, cfg)

    original = count_params(meta_model(cfg))
    model, layers = pruned_meta_model(cfg, method, ratio, first_layer, last_dense)
    pruned = count_params(model)
    nonzero = _nonzero(model, method, ratio, layers)

    if precision == "nf4" and nf4_mode == "paper":
        held = math.ceil(pruned / 4)  # the paper: params / 4, each counted at 2 bytes
        nbytes = 2 * held
    elif precision == "nf4":
        nbytes = bnb_nf4_bytes(model)
        held = math.ceil(nbytes / 2)
    else:
        held = pruned
        nbytes = BYTES[precision] * pruned
    return MemoryReport(
        model=label,
        method=method,
        ratio=ratio,
        precision=precision,
        nf4_mode=nf4_mode if precision == "nf4" else None,
        original_params=original,
        pruned_params=pruned,
        nonzero_params=nonzero,
        held_params=held,
        held_bytes=nbytes,
        reduction=original / held,
        gib=nbytes / GIB,
        layers=list(layers),
    )


# Rows of the paper's Tables 4-6: (title, [(config, method, ratio, precision), ...]).
PAPER_TABLES: list[tuple[str, list[tuple[str, str, float, str]]]] = [
    (
        "Table 4: LLaMA-2-13B, LoRAM-Stru / LoRAM-Rand (bf16); LLaMA-2-7B LoRA baseline",
        [
            ("llama-2-7b", "none", 0.0, "bf16"),
            ("llama-2-13b", "none", 0.0, "bf16"),
            ("llama-2-13b", "random", 0.65, "bf16"),
            ("llama-2-13b", "structured", 0.65, "bf16"),
        ],
    ),
    (
        "Table 5: LLaMA-2-70B, QLoRAM-Stru (NF4); LLaMA-2-13B LoRA baseline",
        [
            ("llama-2-13b", "none", 0.0, "bf16"),
            ("llama-2-70b", "none", 0.0, "bf16"),
            ("llama-2-70b", "structured", 0.65, "nf4"),
            ("llama-2-70b", "structured", 0.75, "nf4"),
            ("llama-2-70b", "structured", 0.85, "nf4"),
            ("llama-2-70b", "structured", 0.95, "nf4"),
        ],
    ),
    (
        "Table 6: LLaMA-3.1-70B, QLoRAM-Stru (NF4); LLaMA-3.1-8B LoRA baseline",
        [
            ("llama-3.1-8b", "none", 0.0, "bf16"),
            ("llama-3.1-70b", "none", 0.0, "bf16"),
            ("llama-3.1-70b", "structured", 0.85, "nf4"),
        ],
    ),
]


def paper_tables(nf4_mode: str = "paper") -> list[tuple[str, list[MemoryReport]]]:
    """The rows of the paper's Tables 4-6 (QLoRAM rows in ``nf4_mode``)."""
    return [
        (title, [memory_report(c, m, r, p, nf4_mode) for c, m, r, p in rows])
        for title, rows in PAPER_TABLES
    ]


# ----------------------------------------------------------------------------- printing


def _precision_label(r: MemoryReport) -> str:
    return f"nf4/{r.nf4_mode}" if r.precision == "nf4" else r.precision


def format_table(reports: Sequence[MemoryReport]) -> str:
    """A plain-text table of ``reports``."""
    sparse = any(r.method in ("semi", "unstructured") for r in reports)
    head = ["model", "method", "ratio", "precision", "params original", "params pruned"]
    head += ["params non-zero"] if sparse else []
    head += ["params held", "reduction ×", "GiB"]
    rows = []
    for r in reports:
        row = [r.model, r.method, f"{r.ratio:.2f}", _precision_label(r)]
        row += [f"{r.original_params:,}", f"{r.pruned_params:,}"]
        row += [f"{r.nonzero_params:,}"] if sparse else []
        row += [f"{r.held_params:,}", f"{r.reduction:.2f}", f"{r.gib:.2f}"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    left = {0, 1, 3}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ----------------------------------------------------------------------------- CLI


def _split(values: Iterable[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in str(item).split(",") if v.strip()]


def _ratios(values: Iterable[str] | None) -> list[float | None]:
    out: list[float | None] = []
    for v in _split(values):
        try:
            out.append(float(v))
        except ValueError:
            raise ValueError(f"--ratio {v!r} is not a number") from None
    return out or [None]


def run(args: argparse.Namespace) -> int:
    """The ``loram memory`` command."""
    if args.paper_tables:
        groups = paper_tables(args.nf4_mode)
    else:
        configs = _split(args.config)
        if not configs:
            raise ValueError(
                f"give --config NAME|PATH (available: {', '.join(available_configs())}) "
                "or --paper-tables"
            )
        ratios = _ratios(args.ratio)
        reports = [
            memory_report(
                c,
                args.method,
                r,
                args.precision,
                args.nf4_mode,
                first_layer=args.first_layer,
                last_dense=args.last_dense,
            )
            for c in configs
            for r in ratios
        ]
        groups = [("", reports)]
    if args.json:
        out = [dict(r.as_dict(), table=t) if t else r.as_dict() for t, rs in groups for r in rs]
        print(json.dumps(out, indent=2))
        return 0
    blocks = []
    for title, reports in groups:
        blocks.append((f"{title}\n" if title else "") + format_table(reports))
    print("\n\n".join(blocks))
    if args.paper_tables or any(r.precision == "nf4" for _, rs in groups for r in rs):
        print(
            "\nheld = parameters counted for memory (nf4: 16-bit equivalents, bytes / 2); "
            "reduction = original / held; GiB = bytes / 2^30"
        )
    return 0


def add_parser(subparsers) -> None:
    """Register the ``memory`` sub-command."""
    p = subparsers.add_parser(
        "memory",
        help="parameters and weight memory of an original vs a pruned model (from a config)",
        description="Count parameters of the original and the pruned model from a config alone "
        "(meta device) and the memory the pruned weights take in a given precision.",
    )
    p.add_argument(
        "--config",
        action="append",
        metavar="NAME|PATH",
        help=f"shipped config ({', '.join(available_configs())}), config.json or model dir; "
        "repeatable or comma separated",
    )
    p.add_argument("--method", choices=METHODS, default="structured", help="pruning method")
    p.add_argument(
        "--ratio",
        action="append",
        metavar="R",
        help="pruning ratio in [0, 1), repeatable or comma separated "
        "(default: 0.65 structured/random, 0.5 semi, 0.55 unstructured)",
    )
    p.add_argument("--precision", type=str.lower, choices=PRECISIONS, default="bf16")
    p.add_argument(
        "--nf4-mode",
        choices=NF4_MODES,
        default="paper",
        help="nf4: the paper's count (params / 4 at 2 bytes) or what bitsandbytes stores",
    )
    p.add_argument("--first-layer", type=int, default=None, help="first pruned decoder layer")
    p.add_argument("--last-dense", type=int, default=None, help="last layers kept dense")
    p.add_argument("--paper-tables", action="store_true", help="rows of the paper's Tables 4-6")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
