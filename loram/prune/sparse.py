"""LoRAM-Semi (N:M) and LoRAM-Unst (unstructured) pruning with Wanda, SparseGPT or magnitude.

The walk over the model is sequential, as in the Wanda and SparseGPT papers: the inputs of the
first decoder layer are captured for the calibration batches, then each layer in turn gets
input statistics for its seven projections (forward hooks), is pruned, and is re-run with the
pruned weights to produce the inputs of the next layer. Only one layer's activations are held
beyond the model itself.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from loram.prune.common import LINEAR_PROJ, module_path
from loram.prune.masks import check_masks

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "loram-pruned/1"
MASKS_FILE = "loram_masks.safetensors"
CRITERIA = ("wanda", "sparsegpt", "magnitude")
PATTERNS = ("unstructured", "nm")

Pattern = Literal["unstructured", "nm"]
Criterion = Literal["wanda", "sparsegpt", "magnitude"]


# --------------------------------------------------------------------------------------------
# Per-matrix algorithms
# --------------------------------------------------------------------------------------------


def target_zeros(numel: int, ratio: float) -> int:
    """Zeros required for ``ratio`` of ``numel`` weights: ``round(numel * ratio)`` (half up)."""
    return math.floor(round(numel * ratio, 9) + 0.5)


def row_targets(rows: int, cols: int, ratio: float) -> torch.Tensor:
    """Zeros per row: ``floor(T / rows)`` each, one more for the first ``T % rows`` rows."""
    total = target_zeros(rows * cols, ratio)
    per_row = torch.full((rows,), total // rows, dtype=torch.long)
    per_row[: total % rows] += 1
    return per_row


def _lowest_per_row(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask, True where an entry is among the ``counts[row]`` lowest scores of its row."""
    order = torch.sort(score, dim=1, stable=True).indices
    rank_hit = torch.arange(score.shape[1], device=score.device)[None, :] < counts[:, None].to(
        score.device
    )
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, rank_hit)


def _lowest_per_group(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask, True at the ``m - n`` lowest scores of every group of ``m`` consecutive columns."""
    rows, cols = score.shape
    grouped = score.reshape(rows, cols // m, m)
    pruned = torch.zeros_like(grouped, dtype=torch.bool)
    if m - n > 0:
        idx = torch.topk(grouped, m - n, dim=2, largest=False).indices
        pruned.scatter_(2, idx, True)
    return pruned.reshape(rows, cols)


def _check_nm(cols: int, n: int, m: int, name: str = "weight") -> None:
    if not 1 <= n <= m:
        raise ValueError(f"N:M sparsity needs 1 <= n <= m, got n = {n}, m = {m}")
    if cols % m != 0:
        raise ValueError(
            f"N:M sparsity {n}:{m} needs in_features divisible by m = {m}, but {name} has "
            f"in_features = {cols}"
        )


def score_mask(
    weight: torch.Tensor,
    *,
    pattern: Pattern,
    ratio: float = 0.55,
    n: int = 2,
    m: int = 4,
    act_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept-mask (True = kept) from |W| (magnitude) or |W|·‖X_j‖₂ (Wanda, when ``act_sq`` given).

    ``act_sq`` is the per-input-channel sum of squared activations. Unstructured masks compare
    scores per output row and hit ``round(numel * ratio)`` zeros exactly; N:M masks prune the
    ``m - n`` lowest of every ``m`` consecutive inputs.
    """
    # Scores in fp32 for any weight dtype (bf16 would tie many near-equal scores).
    score = weight.detach().float().abs()
    if act_sq is not None:
        score = score * act_sq.to(score.device, torch.float32).clamp_min(0).sqrt()[None, :]
    rows, cols = score.shape
    if pattern == "nm":
        _check_nm(cols, n, m)
        return ~_lowest_per_group(score, n, m)
    if pattern == "unstructured":
        return ~_lowest_per_row(score, row_targets(rows, cols, ratio))
    raise ValueError(f"pattern = {pattern!r}: expected one of {PATTERNS}")


PERCDAMP = 0.01
"""SparseGPT's damping: this fraction of the mean diagonal of the Hessian is added to it."""


def _inverse_hessian_chol(
    hessian: torch.Tensor, percdamp: float, overwrite: bool = False
) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (retrying with more damping).

    The damping is added to the diagonal only, as ``H + damp * mean(diag H) * I`` would, and
    intermediates are freed as soon as the next one exists, so at most two ``cols x cols`` fp32
    matrices are alive at once (for the widest input of a 1.5B model, 8,960, each is 0.32 GB).
    ``overwrite=True``: ``hessian`` (fp32) is damped in place and released: pass a Hessian no one
    else holds (:meth:`_InputStats.take_hessian`) and it is one of the two.
    """
    h = hessian.to(torch.float32)
    if h is hessian and not overwrite:
        h = h.clone()
    del hessian
    diag = h.diagonal()
    diag[diag == 0] = 1.0  # an input that is always zero: any positive value works
    base = diag.mean().item()
    undamped = diag.clone()
    damp = percdamp
    for _ in range(6):
        diag.copy_(undamped + damp * base)
        lower, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            del h, diag
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return upper
            # Rare: rebuild the damped Hessian from its inverse and retry with more damping.
            del upper
            h = torch.linalg.inv(hinv)
            del hinv
            diag = h.diagonal()
        else:
            del lower
        log.warning("Hessian not positive definite with dampening %.3g; retrying", damp)
        damp *= 10
    raise RuntimeError("SparseGPT: Hessian is not positive definite even with heavy dampening")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    *,
    hinv: torch.Tensor | None = None,
    pattern: Pattern,
    ratio: float = 0.55,
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    percdamp: float = PERCDAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: OBS pruning of ``weight`` (out × in) given the layer Hessian ``H = 2XXᵀ``.

    Columns are processed in blocks; the mask is chosen adaptively at the start of each block
    (unstructured: the lowest w²/[H⁻¹]²_jj in the block, with the block's share of the exact
    zero count) or of each group of ``m`` columns (N:M), and the pruning error of every column is
    compensated on the columns not yet processed. ``hinv``: the upper Cholesky factor of the
    damped inverse Hessian, already computed (``hessian`` is then unused). Returns (pruned
    weight, kept mask).
    """
    rows, cols = weight.shape
    if pattern == "nm":
        _check_nm(cols, n, m)
        blocksize = max(m, blocksize // m * m)
    elif pattern != "unstructured":
        raise ValueError(f"pattern = {pattern!r}: expected one of {PATTERNS}")
    # The OBS updates and the inverse Hessian are fp32 whatever the model's dtype: the error
    # compensation accumulates over all columns and the Cholesky factor of a bf16 Hessian is
    # not reliable. The result is cast back to the weight's dtype once, at the end.
    w = weight.detach().to(torch.float32).clone()
    if hinv is None:
        if hessian is None:
            raise ValueError("sparsegpt_prune needs the Hessian or its inverse factor")
        hinv = _inverse_hessian_chol(hessian.to(w.device), percdamp)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    total = target_zeros(rows * cols, ratio) if pattern == "unstructured" else 0

    def cum_target(col: int) -> int:  # zeros allotted to columns [0, col)
        return math.floor(total * col / cols + 0.5)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag1 = torch.diag(hinv1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if pattern == "unstructured":
            k = cum_target(i2) - cum_target(i1)
            if k > 0:
                score = (w1**2 / diag1[None, :] ** 2).flatten()
                idx = torch.topk(score, k, largest=False).indices
                mask1.view(-1)[idx] = True
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if pattern == "nm" and i % m == 0:
                score = w1[:, i : i + m] ** 2 / diag1[None, i : i + m] ** 2
                mask1[:, i : i + m] = _lowest_per_group(score, n, m)
            q = col.clone()
            q[mask1[:, i]] = 0.0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    w[pruned] = 0.0
    return w.to(weight.dtype), ~pruned


def prune_matrix(
    weight: torch.Tensor,
    *,
    criterion: Criterion,
    pattern: Pattern,
    ratio: float = 0.55,
    n: int = 2,
    m: int = 4,
    act_sq: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    hinv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight matrix; returns (new weight with exact zeros, kept mask). SparseGPT takes
    the input Hessian, or ``hinv``, the upper Cholesky factor of its damped inverse."""
    if criterion == "sparsegpt":
        if hessian is None and hinv is None:
            raise ValueError("sparsegpt needs the input Hessian")
        return sparsegpt_prune(weight, hessian, hinv=hinv, pattern=pattern, ratio=ratio, n=n, m=m)
    if criterion == "wanda":
        if act_sq is None:
            raise ValueError("wanda needs the input activation norms")
    elif criterion == "magnitude":
        act_sq = None
    else:
        raise ValueError(f"criterion = {criterion!r}: expected one of {CRITERIA}")
    keep = score_mask(weight, pattern=pattern, ratio=ratio, n=n, m=m, act_sq=act_sq)
    new = weight.detach().masked_fill(~keep.to(weight.device), 0)
    return new, keep


# --------------------------------------------------------------------------------------------
# Walk over the model
# --------------------------------------------------------------------------------------------


class _InputStats:
    """Running statistics of a linear layer's inputs over the non-padding calibration tokens.

    Accumulated in fp32 whatever the model's dtype: the layers run in the model's (artifact's)
    dtype, but the squared-norm sums (Wanda) and ``Σ x xᵀ`` (SparseGPT's Hessian) add up
    thousands of tokens, which bf16 / fp16 sums would round away.
    """

    def __init__(self, cols: int, hessian: bool, device: torch.device) -> None:
        self.sq = torch.zeros(cols, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(cols, cols, dtype=torch.float32, device=device) if hessian else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.sq += (x * x).sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def _scale(self) -> float:
        return 2.0 / max(self.tokens, 1)

    def hessian(self) -> torch.Tensor:
        """``H = 2/N · Σ x xᵀ``."""
        assert self.xtx is not None
        return self.xtx * self._scale()

    def take_hessian(self) -> torch.Tensor:
        """:meth:`hessian` without a copy: the accumulator is scaled in place and handed over
        (these stats hold it no longer)."""
        assert self.xtx is not None
        h, self.xtx = self.xtx, None
        return h.mul_(self._scale())


class _StopForward(Exception):
    pass


class _Captured:
    """One calibration batch: decoder-layer call arguments and the token (non-padding) mask."""

    def __init__(self, token_mask: torch.Tensor | None) -> None:
        self.token_mask = token_mask
        self.hidden: torch.Tensor | None = None
        self.calls: dict[int, tuple[tuple, dict[str, Any], bool]] = {}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (``model.layers``)."""
    try:
        return model.get_submodule("model.layers")
    except AttributeError as exc:
        raise ValueError(
            f"{type(model).__name__} has no 'model.layers': expected a Llama-family *ForCausalLM"
        ) from exc


def _normalise_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        ids, att = batch, None
    elif isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError("each calibration batch needs 'input_ids'")
        ids, att = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError(f"calibration batch must be a dict or a tensor, got {type(batch).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None, :]
    if att is not None:
        att = torch.as_tensor(att)
        if att.dim() == 1:
            att = att[None, :]
        if att.shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(att.shape)} != input_ids shape {tuple(ids.shape)}"
            )
        att = att.to(device)
    return ids.to(device), att


def _capture(
    model: nn.Module, layers: nn.ModuleList, last: int, batches: Iterable[Any]
) -> list[_Captured]:
    """Record, per batch, the first layer's input and every layer's call arguments up to ``last``.

    Each decoder layer's ``forward`` is temporarily replaced by a recorder that returns its input
    unchanged (so nothing is computed), and the recorder of layer ``last`` stops the forward.
    """
    device = model.get_input_embeddings().weight.device
    captured: list[_Captured] = []
    current: list[_Captured] = []

    def make_stub(j: int):
        def stub(*args: Any, **kwargs: Any):
            rec = current[0]
            if args:
                hidden, rest, as_kw = args[0], tuple(args[1:]), False
            else:
                hidden, rest, as_kw = kwargs.pop("hidden_states"), (), True
            for key in ("cache", "past_key_values", "past_key_value"):
                if key in kwargs:
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            if j == 0:
                rec.hidden = hidden
            rec.calls[j] = (rest, kwargs, as_kw)
            if j == last:
                raise _StopForward
            return hidden

        return stub

    saved = {j: layers[j].__dict__.get("forward") for j in range(last + 1)}
    try:
        for j in range(last + 1):
            layers[j].forward = make_stub(j)
        for batch in batches:
            ids, att = _normalise_batch(batch, device)
            rec = _Captured(att.bool() if att is not None else None)
            current[:] = [rec]
            try:
                model(input_ids=ids, attention_mask=att, use_cache=False)
            except _StopForward:
                pass
            if rec.hidden is None or len(rec.calls) != last + 1:
                raise RuntimeError("could not capture the decoder layers' inputs")
            captured.append(rec)
    finally:
        for j, fwd in saved.items():
            if fwd is None:
                layers[j].__dict__.pop("forward", None)
            else:
                layers[j].forward = fwd
    return captured


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    rest, kwargs, as_kw = call
    out = layer(hidden_states=hidden, **kwargs) if as_kw else layer(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_args(pattern: str, criterion: str, ratio: float, n: int, m: int) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern = {pattern!r}: expected one of {PATTERNS}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion = {criterion!r}: expected one of {CRITERIA}")
    if pattern == "unstructured" and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio = {ratio!r}: expected 0 <= ratio < 1")
    if pattern == "nm" and not 1 <= n <= m:
        raise ValueError(f"N:M sparsity needs 1 <= n <= m, got n = {n}, m = {m}")


@torch.no_grad()
def prune_sparse(
    model: nn.Module,
    layers: Sequence[int],
    *,
    pattern: Pattern = "unstructured",
    ratio: float = 0.55,
    n: int = 2,
    m: int = 4,
    criterion: Criterion = "wanda",
    calib_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune the seven projections of ``layers`` in place to exact zeros; return kept masks.

    ``pattern="nm"`` keeps ``n`` of every ``m`` consecutive inputs (``ratio`` ignored);
    ``"unstructured"`` zeros ``round(numel * ratio)`` weights of each matrix. ``wanda`` and
    ``sparsegpt`` need ``calib_batches`` (dicts with ``input_ids`` and optional
    ``attention_mask``; padding is excluded from the statistics); ``magnitude`` needs none.
    Masks are CPU bool tensors keyed by module path (``model.layers.4.self_attn.q_proj``).
    """
    walk = SparseWalk(
        model,
        layers,
        pattern=pattern,
        ratio=ratio,
        n=n,
        m=m,
        criterion=criterion,
        calib_batches=calib_batches,
    )
    masks: dict[str, torch.Tensor] = {}
    try:
        steps = walk.targets if criterion == "magnitude" else range(walk.last + 1)
        for i in tqdm(steps, desc=f"prune ({criterion})", disable=not progress):
            masks.update(walk.step(i))
    finally:
        walk.close()
    return masks


class SparseWalk:
    """The sequential walk of :func:`prune_sparse`, one decoder layer per :meth:`step`.

    ``step(i)`` must be called for ``i = 0, 1, ...`` in order (up to :attr:`last`; layers after
    it need no step) with layer ``i``'s weights in place; it prunes the layer if it is a target
    and, for the calibrated criteria, runs the calibration activations through it to give the
    next layer its inputs. Layers other than the current one may be on the meta device, so the
    streaming pruner (``loram.prune.stream``) loads one layer at a time; the embeddings must be
    real when the walk is created (they make the first layer's inputs).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        *,
        pattern: Pattern = "unstructured",
        ratio: float = 0.55,
        n: int = 2,
        m: int = 4,
        criterion: Criterion = "wanda",
        calib_batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        _check_args(pattern, criterion, ratio, n, m)
        self.model = model
        self.all_layers = decoder_layers(model)
        self.targets = sorted({int(i) for i in layers})
        for i in self.targets:
            if not 0 <= i < len(self.all_layers):
                raise ValueError(
                    f"layer {i} out of range: the model has {len(self.all_layers)} layers"
                )
        if pattern == "nm":
            for i in self.targets:
                for proj in LINEAR_PROJ:
                    path = module_path(i, proj)
                    _check_nm(model.get_submodule(path).weight.shape[1], n, m, path)
        self.pattern, self.ratio, self.n, self.m, self.criterion = pattern, ratio, n, m, criterion
        self.last = self.targets[-1] if self.targets else -1
        self.wanted = set(self.targets)
        self.was_training = model.training
        self.captured: list[_Captured] = []
        self.hidden: list[torch.Tensor] = []
        if criterion == "magnitude" or not self.targets:
            return
        if calib_batches is None:
            raise ValueError(
                f"criterion {criterion!r} needs calib_batches (use 'magnitude' without)"
            )
        model.eval()
        with torch.no_grad():
            self.captured = _capture(model, self.all_layers, self.last, calib_batches)
        if not self.captured:
            model.train(self.was_training)
            raise ValueError("calib_batches is empty")
        self.hidden = [rec.hidden for rec in self.captured]
        for rec in self.captured:
            rec.hidden = None

    @torch.no_grad()
    def step(self, i: int) -> dict[str, torch.Tensor]:
        """Prune layer ``i`` if it is a target and propagate; return its kept masks."""
        masks: dict[str, torch.Tensor] = {}
        if self.criterion == "magnitude":
            if i in self.wanted:
                for proj in LINEAR_PROJ:
                    path = module_path(i, proj)
                    masks[path] = _prune_module(
                        self.model,
                        path,
                        "magnitude",
                        self.pattern,
                        self.ratio,
                        self.n,
                        self.m,
                        None,
                    )
            return masks
        if i > self.last:
            return masks
        layer = self.all_layers[i]
        if i in self.wanted:
            stats = _collect_stats(
                self.model, layer, i, self.hidden, self.captured, self.criterion == "sparsegpt"
            )
            for proj in LINEAR_PROJ:
                path = module_path(i, proj)
                masks[path] = _prune_module(
                    self.model,
                    path,
                    self.criterion,
                    self.pattern,
                    self.ratio,
                    self.n,
                    self.m,
                    stats.pop(path),
                )
        for b, rec in enumerate(self.captured):
            self.hidden[b] = _run_layer(layer, self.hidden[b], rec.calls.pop(i))
        return masks

    def close(self) -> None:
        """Drop the activations and restore the model's train/eval mode."""
        self.hidden, self.captured = [], []
        self.model.train(self.was_training)


def _collect_stats(
    model: nn.Module,
    layer: nn.Module,
    index: int,
    hidden: list[torch.Tensor],
    captured: list[_Captured],
    need_hessian: bool,
) -> dict[str, _InputStats]:
    """Run ``layer`` on every batch with hooks that accumulate its projections' input stats."""
    stats: dict[str, _InputStats] = {}
    token_mask: list[torch.Tensor | None] = [None]
    handles = []

    def make_hook(st: _InputStats):
        def hook(_mod: nn.Module, inputs: tuple, _out: Any) -> None:
            x = inputs[0]
            tm = token_mask[0]
            if tm is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(tm.shape):
                x = x[tm.to(x.device)]
            st.add(x)

        return hook

    try:
        for proj in LINEAR_PROJ:
            path = module_path(index, proj)
            mod = model.get_submodule(path)
            st = _InputStats(mod.weight.shape[1], need_hessian, mod.weight.device)
            stats[path] = st
            handles.append(mod.register_forward_hook(make_hook(st)))
        for b, rec in enumerate(captured):
            token_mask[0] = rec.token_mask
            _run_layer(layer, hidden[b], rec.calls[index])
    finally:
        for h in handles:
            h.remove()
    return stats


def _prune_module(
    model: nn.Module,
    path: str,
    criterion: str,
    pattern: str,
    ratio: float,
    n: int,
    m: int,
    stats: _InputStats | None,
) -> torch.Tensor:
    weight = model.get_submodule(path).weight
    hinv = None
    if criterion == "sparsegpt" and stats is not None and stats.xtx is not None:
        # The Hessian is damped and factorised in place and freed at once: the widest input's
        # (down_proj) is the largest transient of the whole prune.
        hinv = _inverse_hessian_chol(
            stats.take_hessian().to(weight.device), PERCDAMP, overwrite=True
        )
    new, keep = prune_matrix(
        weight,
        criterion=criterion,  # type: ignore[arg-type]
        pattern=pattern,  # type: ignore[arg-type]
        ratio=ratio,
        n=n,
        m=m,
        act_sq=stats.sq if stats is not None else None,
        hinv=hinv,
    )
    del hinv
    weight.data.copy_(new.to(weight.device, weight.dtype))
    weight.data.masked_fill_(~keep.to(weight.device), 0)
    return keep.to("cpu")


# --------------------------------------------------------------------------------------------
# Keeping the zeros, measuring them, describing them
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def enforce_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero in place every weight whose mask entry is False (e.g. after an optimizer step)."""
    check_masks(model, masks)
    for path, keep in masks.items():
        weight = model.get_submodule(path).weight
        weight.masked_fill_(~keep.to(weight.device, torch.bool), 0)


def mask_hooks(
    model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Gradient hooks that zero the gradient at pruned positions; call ``.remove()`` to undo."""
    check_masks(model, masks)
    handles = []
    for path, keep in masks.items():
        weight = model.get_submodule(path).weight
        pruned = ~keep.to(weight.device, torch.bool)
        handles.append(weight.register_hook(lambda g, p=pruned: g.masked_fill(p, 0)))
    return handles


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _count(zeros: int, numel: int) -> dict[str, float | int]:
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}


@torch.no_grad()
def sparsity_report(
    model: nn.Module, layers_or_masks: Sequence[int] | Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Fraction of exact zeros, counted in the weights, of the pruned projections.

    Returns ``{"modules": {path: {zeros, numel, sparsity}}, "layers": {"4": {...}},
    "pruned": {...}, "decoder_linear": {...}}`` where ``pruned`` is over the pruned matrices and
    ``decoder_linear`` over the seven projections of every decoder layer.
    """
    if isinstance(layers_or_masks, Mapping):
        paths = list(layers_or_masks)
    else:
        paths = [module_path(int(i), proj) for i in layers_or_masks for proj in LINEAR_PROJ]
    counts = {}
    for path in paths:
        w = model.get_submodule(path).weight
        counts[path] = (int((w == 0).sum().item()), w.numel())
    all_zeros = all_numel = 0
    for i in range(len(decoder_layers(model))):
        for proj in LINEAR_PROJ:
            w = model.get_submodule(module_path(i, proj)).weight
            all_zeros += int((w == 0).sum().item())
            all_numel += w.numel()
    return sparsity_from_counts(counts, all_zeros, all_numel)


def sparsity_from_counts(
    counts: Mapping[str, tuple[int, int]], all_zeros: int, all_numel: int
) -> dict[str, Any]:
    """:func:`sparsity_report` from ``{path: (zeros, numel)}`` of the pruned matrices and the
    zero / total counts of every decoder layer's seven projections (the streaming pruner
    counts them layer by layer)."""
    modules: dict[str, dict[str, float | int]] = {}
    per_layer: dict[str, list[int]] = {}
    for path, (zeros, numel) in counts.items():
        modules[path] = _count(zeros, numel)
        match = _LAYER_RE.search(path)
        key = match.group(1) if match else "other"
        acc = per_layer.setdefault(key, [0, 0])
        acc[0] += zeros
        acc[1] += numel
    pz = sum(v["zeros"] for v in modules.values())
    pn = sum(v["numel"] for v in modules.values())
    layer_keys = sorted(per_layer, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0))
    return {
        "modules": modules,
        "layers": {k: _count(*per_layer[k]) for k in layer_keys},
        "pruned": _count(int(pz), int(pn)),
        "decoder_linear": _count(all_zeros, all_numel),
    }


def mask_sparsity(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The pruned layers measured against their masks, not against incidental zeros.

    ``mask_sparsity``: fraction of weights the masks remove; ``sparsity``: fraction of weights
    that are removed by the mask AND still exactly zero (equal to ``mask_sparsity`` when
    nothing densified); ``pruned_nonzero``: removed positions holding a non-zero value. Zeros
    at kept positions (which a model may simply have) count in neither.
    """
    removed = zero_removed = numel = 0
    for path, mask in masks.items():
        w = model.get_submodule(path).weight.detach()
        gone = ~mask.to(device=w.device, dtype=torch.bool)
        removed += int(gone.sum().item())
        zero_removed += int((gone & (w == 0)).sum().item())
        numel += w.numel()
    return {
        "mask_sparsity": removed / numel if numel else 0.0,
        "sparsity": zero_removed / numel if numel else 0.0,
        "pruned_nonzero": removed - zero_removed,
        "numel": numel,
    }


def streamed_sparsity(
    model_dir, masks: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(sparsity_report(model, masks), mask_sparsity(model, masks))`` of the model saved in
    ``model_dir``, reading one weight at a time instead of loading the model."""
    from loram.models import load_config
    from loram.shards import ShardReader

    reader = ShardReader(model_dir)
    n_layers = int(load_config(model_dir).num_hidden_layers)
    counts: dict[str, tuple[int, int]] = {}
    all_zeros = all_numel = 0
    removed = zero_removed = numel = 0
    for path, mask in masks.items():
        key = f"{path}.weight"
        if key not in reader:
            raise ValueError(f"mask {path} names no weight in {model_dir}")
        w = reader.get(key)
        if tuple(w.shape) != tuple(mask.shape):
            raise ValueError(
                f"mask {path} has shape {tuple(mask.shape)} but the model's weight has shape "
                f"{tuple(w.shape)}"
            )
        counts[path] = (int((w == 0).sum().item()), w.numel())
        gone = ~mask.to(dtype=torch.bool)
        removed += int(gone.sum().item())
        zero_removed += int((gone & (w == 0)).sum().item())
        numel += w.numel()
    for i in range(n_layers):
        for proj in LINEAR_PROJ:
            w = reader.get(f"{module_path(i, proj)}.weight")
            all_zeros += int((w == 0).sum().item())
            all_numel += w.numel()
    vs_mask = {
        "mask_sparsity": removed / numel if numel else 0.0,
        "sparsity": zero_removed / numel if numel else 0.0,
        "pruned_nonzero": removed - zero_removed,
        "numel": numel,
    }
    return sparsity_from_counts(counts, all_zeros, all_numel), vs_mask


def sparse_manifest(
    model: nn.Module,
    layers: Sequence[int],
    *,
    pattern: Pattern,
    criterion: Criterion,
    ratio: float = 0.55,
    n: int = 2,
    m: int = 4,
    sparsity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``loram-pruned/1`` manifest of a semi / unstructured pruned model (JSON-serializable).

    ``ratio`` is the effective one: ``1 - n/m`` for N:M, the requested ratio otherwise; ``n``
    and ``m`` are ``None`` for unstructured. ``sparsity`` defaults to :func:`sparsity_report`.
    """
    _check_args(pattern, criterion, ratio, n, m)
    layers = sorted({int(i) for i in layers})
    nm = pattern == "nm"
    return {
        "format": MANIFEST_FORMAT,
        "method": "semi" if nm else "unstructured",
        "criterion": criterion,
        "ratio": 1.0 - n / m if nm else float(ratio),
        "n": n if nm else None,
        "m": m if nm else None,
        "layers": layers,
        "masks_file": MASKS_FILE,
        "sparsity": dict(sparsity) if sparsity is not None else sparsity_report(model, layers),
    }
