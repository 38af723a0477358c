"""Memory planner (``loram plan``): will a LoRA / LoRAM / QLoRAM training run fit?

Predicts the peak training memory of one run from the model's config alone (meta device, no
weights), broken down into what holds it:

* ``weights``: the frozen base as held during training (bf16 / fp32; NF4 as bitsandbytes stores
  it, :func:`loram.memory.bnb_nf4_bytes`); pruned shapes from :func:`loram.memory.pruned_meta_model`;
* ``lora`` / ``grads`` / ``optimizer``: the adapters in fp32 (peft's ``autocast_adapter_dtype``,
  as ``loram.train`` uses), their gradients and AdamW's two fp32 moments;
* ``activations``: what autograd keeps for the backward pass, counted tensor by tensor from the
  architecture (:func:`layer_saved`): RMSNorm inputs in fp32, the q / k / v / output / log-sum-exp
  that SDPA keeps (or the score matrices of eager attention), SiLU and gating inputs of the MLP,
  the fp32 inputs of every LoRA ``A`` (dropout outputs) and ``B``, dropout masks (fp32 noise on
  CPU, one byte on CUDA). With activation checkpointing: the layer inputs plus one layer
  recomputed in the backward pass. The count equals what autograd really saves (tests compare it
  with the saved tensors of a real peft model);
* ``logits``: the logits and the loss's copies at the loss's peak (stock loss: logits, their
  fp32 copy and ``log_softmax``; in the backward: three fp32 copies); a chunked loss holds one
  chunk of ``loss_chunk`` tokens at a time;
* ``overhead``: the runtime (``CPU_OVERHEAD_MIB`` on CPU, measured; nothing on CUDA, where
  ``max_memory_allocated`` does not count the CUDA context).

The peak is ``weights + lora + grads + optimizer + overhead + max(phase)`` over the phases of a
step (the loss at the end of the forward pass, and, with checkpointing, a layer's recomputation
in the backward pass). Gradients are counted whole, which they are at the peak when gradients
accumulate over micro-batches (otherwise an upper bound by their own small size).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from loram.config import PruneParams
from loram.memory import (
    BYTES,
    available_configs,
    bnb_nf4_bytes,
    config_label,
    count_params,
    decoder_layers,
    load_config,
    pruned_meta_model,
)
from loram.prune.common import ATTN_PROJ, LINEAR_PROJ, MLP_PROJ

MIB = 2**20
GIB = 2**30
# kept MLP channels are rounded as the pipeline's pruning rounds them (prune.round_to)
DEFAULT_ROUND_TO: int = PruneParams.model_fields["round_to"].default

# Methods: (pruning method of loram.memory, NF4 base).
METHODS: dict[str, tuple[str, bool]] = {
    "lora": ("none", False),
    "qlora": ("none", True),
    "loram-stru": ("structured", False),
    "loram-rand": ("random", False),
    "loram-semi": ("semi", False),
    "loram-unst": ("unstructured", False),
    "qloram-stru": ("structured", True),
    "qloram-rand": ("random", True),
}
DEFAULT_METHODS = ("lora", "loram-stru", "qloram-stru")
DEFAULT_RATIO = {"structured": 0.65, "random": 0.65, "semi": 0.5, "unstructured": 0.55, "none": 0.0}
ATTENTION = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")
# Bytes of the activations by compute precision.
COMPUTE = {"bf16": 2, "fp16": 2, "fp32": 4}
LORA_BYTES = 4  # adapters, their inputs and gradients: fp32 (peft autocast_adapter_dtype)

# Runtime memory on CPU that no tensor accounts for (thread pools, kernel scratch, allocator
# metadata): calibrated as the peak RSS above the pre-load RSS of benchmarks/train_cost.py's
# arms on the tiny model, where every tensor together is under 10 MiB: 43-58 MiB for LoRA and
# LoRAM, 70-76 MiB for QLoRAM (bitsandbytes' CPU path), micro-batch 4 x 32/64 tokens.
CPU_OVERHEAD_MIB = 55.0
CPU_NF4_OVERHEAD_MIB = 20.0  # the QLoRAM arms' extra runtime in the same runs


@dataclass(frozen=True)
class Setting:
    """One training run to plan."""

    method: str = "lora"
    ratio: float | None = None  # None: the method's default (0.65 stru/rand, 0.5 semi, ...)
    # structured / random: kept MLP channels rounded to a multiple of this (prune.round_to)
    round_to: int = DEFAULT_ROUND_TO
    precision: str = "bf16"  # the frozen base's dtype = the compute dtype (nf4: of the non-4-bit)
    r: int = 8
    targets: tuple[str, ...] = LINEAR_PROJ
    lm_head: bool = False
    dropout: float = 0.05
    # CPU dropout masks: torch's nn.Dropout keeps fp32 noise, loram's packed dropout a bool mask
    # (train.dropout_rng); CUDA's dropout keeps a bool mask either way
    dropout_rng: str = "torch"
    micro_batch: int = 4
    seq_len: int = 512
    grad_accum: int = 1
    grad_checkpointing: bool = False
    loss_chunk: int = 0  # tokens per chunk of a chunked loss; 0 = the stock loss
    attention: str = "sdpa"
    device: str = "cuda"
    # dtype the LoRA branch computes in, hence of the inputs it keeps for backward: fp32 in
    # loram.train (peft's autocast_adapter_dtype, no autocast); bf16 in the paper's code (HF
    # Trainer with bf16=True autocasts the fp32 adapters' matmuls, and peft < 0.12 made the
    # adapters of a bf16 base bf16). The adapters, gradients and AdamW state are counted in fp32.
    lora_dtype: str = "fp32"
    first_layer: int | None = None
    last_dense: int | None = None

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}"
            )
        if self.precision not in COMPUTE:
            raise ValueError(
                f"unknown precision {self.precision!r}; expected one of {', '.join(COMPUTE)} "
                "(nf4 is a method: qlora, qloram-stru, qloram-rand)"
            )
        if self.attention not in ATTENTION:
            raise ValueError(
                f"unknown attention {self.attention!r}; expected {' or '.join(ATTENTION)}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected {' or '.join(DEVICES)}")
        bad = [t for t in self.targets if t not in LINEAR_PROJ]
        if bad or not (self.targets or self.lm_head):
            raise ValueError(
                f"LoRA targets {bad or '(none)'} not allowed; choose from {', '.join(LINEAR_PROJ)} "
                "(and --lm-head)"
            )
        for name in ("r", "micro_batch", "seq_len", "grad_accum", "round_to"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk = {self.loss_chunk} must be >= 0 (0: stock loss)")
        if self.lora_dtype not in COMPUTE:
            raise ValueError(
                f"unknown lora_dtype {self.lora_dtype!r}; expected one of {', '.join(COMPUTE)}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout = {self.dropout} must be in [0, 1)")
        if self.dropout_rng not in ("torch", "packed"):
            raise ValueError(f"unknown dropout_rng {self.dropout_rng!r}; expected torch or packed")

    @property
    def lora_bytes(self) -> int:
        """Bytes of an element of the LoRA branch's activations."""
        return COMPUTE[self.lora_dtype]

    @property
    def prune_method(self) -> str:
        return METHODS[self.method][0]

    @property
    def nf4(self) -> bool:
        return METHODS[self.method][1]

    @property
    def pruning_ratio(self) -> float:
        if self.prune_method == "none":
            return 0.0
        return DEFAULT_RATIO[self.prune_method] if self.ratio is None else float(self.ratio)


@dataclass(frozen=True)
class Plan:
    """The predicted peak of one setting, in bytes, by what holds it."""

    model: str
    setting: Setting
    params_held: int  # frozen parameters (4-bit ones counted one each)
    lora_params: int
    weights: int
    lora: int
    grads: int
    optimizer: int
    activations: int  # saved for backward at the peak
    logits: int  # logits and loss copies at the peak
    overhead: int
    peak: int
    # "loss" (end of forward / start of backward), "recompute" (checkpointing: a layer's
    # backward), "load" (QLoRAM on CPU: the dense model before quantisation); the parts above
    # sum to the peak except in the "load" phase
    peak_phase: str
    detail: dict[str, int] = field(default_factory=dict)  # activations by kind, whole model

    @property
    def peak_mib(self) -> float:
        return self.peak / MIB

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["setting"] = asdict(self.setting)
        d["setting"]["targets"] = list(self.setting.targets)
        d["peak_mib"] = round(self.peak_mib, 1)
        return d


# ----------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class LayerDims:
    """Widths of one decoder layer (pruned ones are smaller)."""

    hidden: int
    q_out: int  # query heads x head_dim (= o_proj input)
    kv_out: int  # KV heads x head_dim
    heads: int  # query heads
    mlp: int  # intermediate channels


def layer_dims(model) -> list[LayerDims]:
    """The widths of every decoder layer of a (meta, possibly pruned) model."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        q_out = _out_features(attn.q_proj)
        out.append(
            LayerDims(
                hidden=cfg.hidden_size,
                q_out=q_out,
                kv_out=_out_features(attn.k_proj),
                heads=q_out // head_dim,
                mlp=_out_features(mlp.gate_proj),
            )
        )
    return out


def _out_features(lin) -> int:
    return int(lin.out_features)


def layer_saved(d: LayerDims, s: Setting, seq: int, rg_in: bool) -> tuple[dict[str, int], bool]:
    """Bytes per token that autograd keeps for the backward pass of one decoder layer, by kind,
    and whether the layer's output requires grad.

    ``rg_in``: the layer's input requires grad (false for the first layer: the embeddings are
    frozen, so nothing before its first LoRA needs saving). ``seq``: the sequence length (eager
    attention keeps seq scores per head and token).
    """
    e = COMPUTE[s.precision]
    f = s.lora_bytes
    # dropout: a bool mask on CUDA and with packed masks, noise in f with torch's on CPU
    noise = 1 if s.device == "cuda" or s.dropout_rng == "packed" else f
    tg = set(s.targets)
    out = {"norms": 0, "attention": 0, "mlp": 0, "lora_inputs": 0}
    shared: set[str] = set()  # fp32 tensors already counted (no-dropout fp32 LoRA inputs)

    def lora(name: str, width: int, src: str, rg: bool, counted: bool = False) -> None:
        """A LoRA module on an input of ``width`` (tensor ``src``, requiring grad or not)."""
        if name not in tg:
            return
        b = f * s.r  # lora_B keeps its input (the r-wide output of lora_A)
        if s.dropout > 0:
            b += f * width + (noise * width if rg else 0)  # dropout output (A's input), mask
        elif e != f:
            b += f * width  # each module casts its input to fp32 and A keeps the copy
        elif src not in shared and not counted:
            b += f * width  # the input itself (shared by the modules reading it)
            shared.add(src)
        out["lora_inputs"] += b

    h = d.hidden
    if rg_in:
        out["norms"] += 4 * h + 4  # fp32 input and rsqrt of input_layernorm
    rg_q, rg_k, rg_v = (rg_in or p in tg for p in ("q_proj", "k_proj", "v_proj"))
    for p, width in (("q_proj", h), ("k_proj", h), ("v_proj", h)):
        lora(p, width, "x_norm", rg_in)
    rg_attn = rg_q or rg_k or rg_v
    if rg_attn:
        if s.attention == "sdpa":
            # query and key after RoPE, value, output, and the fp32 log-sum-exp per head
            out["attention"] += e * (2 * d.q_out + 2 * d.kv_out) + 4 * d.heads
        else:
            # scores = q @ k^T keeps k (repeated to every query head) for q's gradient and q for
            # k's; softmax keeps its fp32 output; (weights @ v) keeps the weights (their cast
            # copy unless fp32) for v's gradient and v (repeated) for the weights'
            rg_scores = rg_q or rg_k
            a = e * d.q_out * (rg_q + rg_k + rg_scores)
            if e == 4:
                a += 4 * d.heads * seq if (rg_scores or rg_v) else 0
            else:
                a += 4 * d.heads * seq * rg_scores + e * d.heads * seq * rg_v
            out["attention"] += a
    # o_proj reads the attention output: SDPA keeps it already (fp32, no dropout: no copy)
    lora("o_proj", d.q_out, "attn_out", rg_attn, counted=s.attention == "sdpa")
    rg_mid = rg_in or rg_attn or "o_proj" in tg
    if rg_mid:
        out["norms"] += 4 * h + 4  # post_attention_layernorm
    for p in ("gate_proj", "up_proj"):
        lora(p, h, "x_post", rg_mid)
    rg_gate = rg_mid or "gate_proj" in tg
    rg_up = rg_mid or "up_proj" in tg
    if rg_gate:
        out["mlp"] += e * d.mlp  # SiLU input
    if rg_up:
        out["mlp"] += e * d.mlp  # act(gate), kept by the product with up
    if rg_gate:
        out["mlp"] += e * d.mlp  # up, kept by the product
    rg_prod = rg_gate or rg_up
    lora("down_proj", d.mlp, "prod", rg_prod)
    rg_out = rg_mid or rg_prod or "down_proj" in tg
    return out, rg_out


def activations(
    dims: Sequence[LayerDims], s: Setting, head_dim: int
) -> tuple[list[dict[str, int]], dict[str, int], bool]:
    """Per-token saved bytes of every layer, of the final norm / lm_head LoRA / RoPE tables
    (``rest``, in bytes for the whole micro-batch), and whether the output requires grad."""
    per_layer = []
    rg = False
    for d in dims:
        saved, rg = layer_saved(d, s, s.seq_len, rg)
        per_layer.append(saved)
    T = s.micro_batch * s.seq_len
    e = COMPUTE[s.precision]
    rest = {"norms": 0, "lora_inputs": 0, "rope": 0}
    if rg:
        rest["norms"] = T * (4 * dims[-1].hidden + 4)
    if s.lm_head:
        h = dims[-1].hidden
        # the final norm's output (or its fp32 copy / dropout output) and lora_B's input
        b = s.lora_bytes * (s.r + h)
        if s.dropout > 0 and rg:
            b += (1 if s.device == "cuda" else s.lora_bytes) * h
        rest["lora_inputs"] = T * b
    if per_layer and any(x["attention"] for x in per_layer):
        rest["rope"] = 2 * e * s.seq_len * head_dim  # cos and sin, shared by every layer
    return per_layer, rest, rg or s.lm_head


def loss_bytes(s: Setting, vocab: int, hidden: int) -> int:
    """Logits and the loss's copies at their peak.

    Stock loss (``loram.loss``, ``loss_chunk`` 0): the logits (compute dtype) + their shifted
    fp32 copy + ``log_softmax`` kept for backward; in the backward pass three fp32 copies (NLL's
    gradient, the kept ``log_softmax``, its input gradient). The larger of the two.
    Chunked loss (``loss_chunk`` N): the scored positions' hidden states are gathered into one
    tensor (kept for the checkpointed chunks), and one chunk of N tokens at a time holds the same
    copies as the stock loss (its backward recomputes the chunk): 3 fp32 copies of N x vocab.
    """
    e = COMPUTE[s.precision]
    b, seq = s.micro_batch, s.seq_len
    shifted = b * (seq - 1)
    if s.loss_chunk:
        tokens = min(s.loss_chunk, shifted)
        return e * shifted * hidden + max((e + 8) * tokens * vocab, 12 * tokens * vocab)
    copy = shifted * vocab * 4 if (e != 4 or b > 1) else 0  # fp32 cast / strided-slice reshape
    forward = e * b * seq * vocab + copy + 4 * shifted * vocab
    backward = 12 * shifted * vocab
    return max(forward, backward)


def backward_working_set(d: LayerDims, s: Setting) -> int:
    """Bytes per token of the gradients in flight while a layer's MLP runs its backward pass
    (the widest part of a layer): the gradient of the layer output (compute dtype), the gradient
    reaching the down projection's LoRA input and its cast (LoRA dtype), and the gradients of
    the gate and up outputs (compute dtype)."""
    e = COMPUTE[s.precision]
    return e * d.hidden + s.lora_bytes * d.mlp + 2 * e * d.mlp


# ----------------------------------------------------------------------------- the planner


def _lora_params(model, s: Setting) -> int:
    n = 0
    for layer in decoder_layers(model):
        for p in s.targets:
            lin = getattr(layer.self_attn if p in ATTN_PROJ else layer.mlp, p)
            n += s.r * (lin.in_features + lin.out_features)
    if s.lm_head:
        head = model.get_output_embeddings()
        n += s.r * (head.in_features + head.out_features)
    return n


def _weight_bytes(model, s: Setting) -> tuple[int, int]:
    """(parameters held, bytes) of the frozen base."""
    params = count_params(model)
    if s.nf4:
        # bitsandbytes quantises the decoder projections; the rest (embeddings, norms, biases,
        # lm_head) stays in the base's dtype, which bnb_nf4_bytes counts at 16 bits
        quantised = {
            id(m.weight)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head"
        }
        rest = sum(p.numel() for p in model.parameters() if id(p) not in quantised)
        return params, bnb_nf4_bytes(model) + (BYTES[s.precision] - 2) * rest
    return params, BYTES[s.precision] * params


def plan(config: Any, setting: Setting, name: str | None = None) -> Plan:
    """The predicted peak training memory of ``setting`` on the model of ``config``."""
    setting.check()
    cfg = load_config(config)
    label = name or config_label(config, cfg)
    model, _ = pruned_meta_model(
        cfg,
        setting.prune_method,
        setting.pruning_ratio,
        setting.first_layer,
        setting.last_dense,
        setting.round_to,
    )
    s = setting
    T = s.micro_batch * s.seq_len
    e = COMPUTE[s.precision]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dims = layer_dims(model)
    per_layer, rest, _ = activations(dims, s, head_dim)

    params, weights = _weight_bytes(model, s)
    n_lora = _lora_params(model, s)
    lora = LORA_BYTES * n_lora
    grads = LORA_BYTES * n_lora
    optimizer = 2 * LORA_BYTES * n_lora  # AdamW exp_avg, exp_avg_sq
    overhead = 0
    if s.device == "cpu":
        overhead = int((CPU_OVERHEAD_MIB + (CPU_NF4_OVERHEAD_MIB if s.nf4 else 0)) * MIB)
    logits = loss_bytes(s, cfg.vocab_size, cfg.hidden_size)
    rest_bytes = sum(rest.values())

    detail = {
        k: T * sum(x[k] for x in per_layer) for k in ("norms", "attention", "mlp", "lora_inputs")
    }
    detail["norms"] += rest["norms"]
    detail["lora_inputs"] += rest["lora_inputs"]
    detail["rope"] = rest["rope"]
    layers_total = T * sum(sum(x.values()) for x in per_layer)
    if not s.grad_checkpointing:
        acts, phase = layers_total + rest_bytes, "loss"
        peak_dyn = acts + logits
    else:
        # checkpoints: every layer's input (compute dtype); the backward recomputes one layer
        # and runs its backward pass (the gradients in flight)
        inputs = len(dims) * T * e * dims[0].hidden
        biggest = max(
            T * (sum(x.values()) + backward_working_set(d, s)) for x, d in zip(per_layer, dims)
        )
        loss_phase = inputs + rest_bytes + logits
        recompute = inputs + biggest
        detail = {"checkpoints": inputs, "one_layer": biggest, **rest}
        if loss_phase >= recompute:
            acts, phase, peak_dyn = inputs + rest_bytes, "loss", loss_phase
        else:
            acts, phase, peak_dyn = recompute, "recompute", recompute
    quant_transient = 0
    if s.nf4:
        # a 4-bit projection is dequantised to the compute dtype for its matmul
        quant_transient = max(
            e * lin.in_features * lin.out_features
            for layer in decoder_layers(model)
            for lin in [getattr(layer.self_attn, p) for p in ATTN_PROJ]
            + [getattr(layer.mlp, p) for p in MLP_PROJ]
        )
        detail["dequantised_weight"] = quant_transient
    peak = weights + lora + grads + optimizer + overhead + peak_dyn + quant_transient
    load = 0
    if s.nf4 and s.device == "cpu":
        # loram quantises on the CPU after loading: the dense (pruned) model in its dtype plus
        # one projection's fp32 copy (quantize_nf4 upcasts it) exist before training starts
        biggest = max(
            lin.in_features * lin.out_features
            for layer in decoder_layers(model)
            for lin in [getattr(layer.self_attn, p) for p in ATTN_PROJ]
            + [getattr(layer.mlp, p) for p in MLP_PROJ]
        )
        load = BYTES[s.precision] * params + 4 * biggest + overhead
        detail["load_peak"] = load
        if load > peak:
            peak, phase = load, "load"
    return Plan(
        model=label,
        setting=s,
        params_held=params,
        lora_params=n_lora,
        weights=weights,
        lora=lora,
        grads=grads,
        optimizer=optimizer,
        activations=acts + quant_transient,
        logits=logits if phase == "loss" else 0,
        overhead=overhead,
        peak=peak,
        peak_phase=phase,
        detail=detail,
    )


def smallest_fitting_ratio(
    config: Any, setting: Setting, budget: int, step: float = 0.01, name: str | None = None
) -> tuple[float, Plan] | None:
    """The smallest pruning ratio (on a grid of ``step``) at which ``setting`` fits ``budget``
    bytes, with its plan; None if even the largest ratio below 1 does not fit.

    The peak does not grow with the ratio (kept channels and heads only shrink), so a bisection
    over the grid finds the boundary.
    """
    if setting.prune_method in ("none", "semi", "unstructured"):
        return None  # the ratio does not change what is held
    grid = [round(i * step, 6) for i in range(1, int(round(1 / step)))]

    def at(i: int) -> Plan:
        return plan(config, replace(setting, ratio=grid[i]), name=name)

    hi = len(grid) - 1
    last = at(hi)
    if last.peak > budget:
        return None
    lo = 0
    first = at(lo)
    if first.peak <= budget:
        return grid[lo], first
    best = last
    while hi - lo > 1:  # invariant: grid[lo] does not fit, grid[hi] fits
        mid = (lo + hi) // 2
        p = at(mid)
        if p.peak <= budget:
            hi, best = mid, p
        else:
            lo = mid
    return grid[hi], best


# ----------------------------------------------------------------------------- printing


def parse_size(text: str) -> int:
    """Bytes of a memory size: ``80GB`` / ``80GiB`` / ``80G`` (GPU memory is sold in binary
    units: an "80GB" A100 has 81,920 MiB, so GB means GiB here), ``24000MiB`` / ``24000MB``,
    ``1TB``; a plain number is GiB."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|)\s*", str(text), re.I)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(
            f"memory budget {text!r} is not a size; use e.g. 80GB, 80GiB, 24000MiB or 40 (GiB)"
        )
    value, unit = float(m.group(1)), m.group(2).lower()
    power = "kmgt".index(unit[0]) + 1 if unit else 3
    return int(value * 1024**power)


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f}"


def format_plans(plans: Sequence[Plan], budget: int | None = None) -> str:
    """A plain-text table of ``plans`` (MiB), with a fit column for ``budget``."""
    head = ["model", "method", "ratio", "params held", "weights", "LoRA+grad+optim"]
    head += ["activations", "logits/loss", "overhead", "peak MiB", "peak GiB"]
    head += ["fits"] if budget else []
    rows = []
    for p in plans:
        s = p.setting
        row = [p.model, s.method, f"{s.pruning_ratio:.2f}", f"{p.params_held:,}", _mib(p.weights)]
        row += [_mib(p.lora + p.grads + p.optimizer), _mib(p.activations), _mib(p.logits)]
        row += [_mib(p.overhead), _mib(p.peak), f"{p.peak / GIB:.2f}"]
        if budget:
            row.append("yes" if p.peak <= budget else "NO")
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    left = {0, 1, len(head) - 1} if budget else {0, 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def describe(s: Setting) -> str:
    """One line of the setting's shape."""
    parts = [
        f"micro-batch {s.micro_batch} x {s.seq_len} tokens",
        f"base {s.precision}",
        f"LoRA r {s.r} on {','.join(s.targets)}{' + lm_head' if s.lm_head else ''}",
        f"dropout {s.dropout}",
        f"LoRA compute {s.lora_dtype}",
        f"attention {s.attention}",
        f"checkpointing {'on' if s.grad_checkpointing else 'off'}",
        f"loss {'chunks of ' + str(s.loss_chunk) + ' tokens' if s.loss_chunk else 'stock'}",
        f"device {s.device}",
    ]
    return ", ".join(parts)


# ----------------------------------------------------------------------------- CLI


def resolve_model(spec: str):
    """A config for ``spec``: a shipped config name, a config.json, a model dir, a tiny or
    embedded model name of ``loram.models``, or a hub id (read from the local cache or the hub)."""
    from loram.models import EMBEDDED, TINY

    text = str(spec).strip()
    if text in TINY:
        from loram import tiny

        return {"tiny-llama": tiny.tiny_llama, "tiny-qwen2": tiny.tiny_qwen2}[text]().config
    try:
        return load_config(text)
    except ValueError:
        pass
    if text in EMBEDDED:
        from transformers import AutoConfig

        from loram.models import resolve_source

        src = resolve_source(text)
        return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return load_config(text)  # raises the accountant's error (lists the shipped configs)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(text)
    except OSError as exc:
        raise ValueError(
            f"model {text!r}: not a shipped config ({', '.join(available_configs())}), a local "
            f"directory or config.json, and no config for this hub id is available here "
            f"({exc.__class__.__name__})"
        ) from None


def _split(values: Iterable[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in str(item).split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    """The ``loram plan`` command."""
    methods = _split(args.method) or list(DEFAULT_METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; expected one of {', '.join(METHODS)}")
    targets = tuple(_split(args.targets)) if args.targets else LINEAR_PROJ
    budget = parse_size(args.budget) if args.budget else None
    cfg = resolve_model(args.model)
    label = config_label(args.model, cfg) if not str(args.model).count("/") == 1 else args.model
    base = Setting(
        precision=args.precision,
        r=args.r,
        targets=targets,
        lm_head=args.lm_head,
        dropout=args.dropout,
        dropout_rng=args.dropout_rng,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        grad_checkpointing=args.grad_checkpointing,
        loss_chunk=args.loss_chunk,
        attention=args.attention,
        device=args.device,
        lora_dtype=args.lora_dtype,
        first_layer=args.first_layer,
        last_dense=args.last_dense,
        round_to=args.round_to,
    )
    base.check()
    plans = [plan(cfg, replace(base, method=m, ratio=args.ratio), name=label) for m in methods]
    suggestions = {}
    if budget:
        for p in plans:
            if p.setting.prune_method in ("structured", "random"):
                found = smallest_fitting_ratio(cfg, p.setting, budget, name=label)
                suggestions[p.setting.method] = found
    if args.json:
        out = {
            "model": label,
            "budget_bytes": budget,
            "plans": [
                dict(p.as_dict(), fits=(p.peak <= budget) if budget else None) for p in plans
            ],
            "smallest_fitting_ratio": {
                m: (None if v is None else {"ratio": v[0], "peak_mib": round(v[1].peak_mib, 1)})
                for m, v in suggestions.items()
            },
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"{label}: {describe(base)}")
    if budget:
        print(f"budget {budget / MIB:,.0f} MiB ({budget / GIB:.2f} GiB)")
    print()
    print(format_plans(plans, budget))
    print(
        "\nMiB = 2^20 bytes. weights: frozen base as held (NF4: packed 4-bit + constants); "
        "LoRA+grad+optim: fp32 adapters, gradients, AdamW moments; activations: kept for backward "
        f"at the peak ({', '.join(sorted({p.peak_phase for p in plans}))} phase); logits/loss: "
        "the loss's copies at the peak."
    )
    for m, v in suggestions.items():
        if v is None:
            print(
                f"{m}: does not fit at any ratio below 1 (the unpruned layers, embeddings and "
                "activations alone exceed the budget)"
            )
        else:
            print(f"{m}: smallest ratio that fits: {v[0]:.2f} (peak {v[1].peak_mib:,.0f} MiB)")
    return 0


def add_parser(subparsers) -> None:
    """Register the ``plan`` sub-command."""
    p = subparsers.add_parser(
        "plan",
        help="will it fit? predicted peak training memory of LoRA / LoRAM / QLoRAM",
        description="Predict the peak training memory (weights, LoRA, gradients, optimizer, "
        "activations, logits) of LoRA on the full model, LoRAM and QLoRAM from the model's config, "
        "say which fit a memory budget and the smallest pruning ratio that fits.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME|PATH|HUB_ID",
        help=f"shipped config ({', '.join(available_configs())}), config.json, model dir, "
        "tiny-llama / tiny-qwen2 / smollm2-135m, or a hub id",
    )
    p.add_argument(
        "--method",
        action="append",
        metavar="M",
        help=f"{', '.join(METHODS)}; repeatable or comma separated "
        f"(default: {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--ratio", type=float, default=None, help="pruning ratio (default: the method's)"
    )
    p.add_argument("--precision", type=str.lower, choices=tuple(COMPUTE), default="bf16",
                   help="dtype of the frozen base and of the activations (QLoRAM: of the non-4-bit "
                   "parts and the compute)")  # fmt: skip
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", action="append", metavar="PROJ",
                   help=f"LoRA targets (default: {','.join(LINEAR_PROJ)})")  # fmt: skip
    p.add_argument("--lm-head", action="store_true", help="LoRA on lm_head too (the paper's)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--dropout-rng", choices=("packed", "torch"), default="packed",
                   help="CPU dropout masks as train.dropout_rng draws them (packed: a 1-byte mask "
                   "kept, loram's default; torch: nn.Dropout's fp32 noise)")  # fmt: skip
    p.add_argument("--lora-dtype", type=str.lower, choices=tuple(COMPUTE), default="fp32",
                   help="dtype the LoRA branch computes in (fp32: loram; bf16: the paper's code, "
                   "HF Trainer with bf16 autocast)")  # fmt: skip
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="tokens per chunk of a chunked loss (0: the stock loss)")  # fmt: skip
    p.add_argument("--attention", choices=ATTENTION, default="sdpa")
    p.add_argument("--device", choices=DEVICES, default="cuda",
                   help="cuda: max_memory_allocated; cpu: RSS above the pre-load RSS")  # fmt: skip
    p.add_argument("--budget", default=None, help="GPU memory budget, e.g. 80GB, 24GiB, 40000MiB")
    p.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO,
                   help="kept MLP channels rounded to a multiple of this, as prune.round_to "
                   f"(default {DEFAULT_ROUND_TO}; 1: the ratio's exact count)")  # fmt: skip
    p.add_argument("--first-layer", type=int, default=None, help="first pruned decoder layer")
    p.add_argument("--last-dense", type=int, default=None, help="last layers kept dense")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
