"""Float tolerances derived from the computation, not fixed constants (test-only helpers).

Rounding model (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-3). Every
floating-point operation is exact up to a relative error of at most ``u = eps / 2``, with
``eps = torch.finfo(dtype).eps`` (1.19e-7 for float32, 2.22e-16 for float64).

1. A sum or dot product of ``K`` terms, in *any* order (so with any BLAS blocking, SIMD width or
   thread count), is off by at most ``γ_K · Σ|a_i b_i|`` with ``γ_K = K·u / (1 - K·u)``
   (Higham, eq. 3.5). For short reductions this worst case is tight enough to use as is:
   ``merge_bound`` (``W + s·B·A``, the LoRA rank is 4) and ``sum_rtol`` (sums of non-negative
   terms, whose relative error is at most ``γ_K`` because ``Σ|x_i| = |Σ x_i|``).

2. For long reductions and whole networks the worst case is far too pessimistic. Rounding errors
   behave like independent zero-mean terms, so a length-``K`` reduction is off by about
   ``eps · sqrt(K) · scale``, ``scale`` the size of its operands / result (Higham, sec. 2.8):
   ``reduction_tol``. A decoder adds, in each of its ``L`` layers, an update computed through
   reductions of length at most ``K = max(hidden_size, intermediate_size)`` to the residual
   stream; RMSNorm keeps each layer's gain near 1, so the layers' errors add up, and the LM
   head adds one more. An end-to-end output (logits; also a loss gradient, its backward pass
   mirrors the forward) computed in ``dtype`` is thus off from the exact value by about::

       per_path = eps(dtype) · sqrt(K) · (L + 1) · max|reference|

   ``forward_tol`` returns ``SAFETY · paths · per_path`` (``forward_rtol`` the same without
   ``max|reference|``): ``paths`` is the number of computations in ``dtype`` being compared
   (1 against a float64 reference, 2 when both sides are float32: triangle inequality), and
   ``SAFETY = 2`` covers the maximum over a few thousand logits and the differences between
   BLAS kernels (AVX2 / AVX-512 / SSE / NEON code paths, thread counts).

Measured on the tiny test models (6 / 6 / 4 layers, K = 96 / 80 / 72, max|logits| about 5.6):
``per_path`` is 2.8e-5 to 4.6e-5; a float32 forward is 0.4e-5 to 2.1e-5 off its float64 value
(at most 0.45 · per_path) with MKL on AVX-512, AVX2 or SSE4.2 and 1, 2 or 4 threads; the
smallest bug the tests look for, one kept row or column of one projection swapped with a pruned
one, moves the logits by 5e-3 or more (over 100 · per_path); dropping the LoRA scale α/r moves
them by more than 1.
"""

from __future__ import annotations

import math

import torch

SAFETY = 2.0
"""Headroom over the first-order estimates above (max over many outputs, BLAS kernels)."""


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Machine epsilon of ``dtype`` (the spacing of floats just above 1)."""
    return torch.finfo(dtype).eps


def reduction_tol(
    k: int, scale: float, dtype: torch.dtype = torch.float32, paths: int = 1
) -> float:
    """Absolute tolerance for results of length-``k`` reductions of operands of size ``scale``.

    ``SAFETY · paths · eps(dtype) · sqrt(k) · scale`` (rule 2 of the module docstring).
    """
    return SAFETY * paths * eps(dtype) * math.sqrt(k) * scale


def forward_rtol(config, dtype: torch.dtype = torch.float32, paths: int = 1) -> float:
    """Relative tolerance for end-to-end quantities of a decoder (logits, loss gradients).

    ``SAFETY · paths · eps(dtype) · sqrt(K) · (L + 1)`` with ``K`` the longest reduction of a
    layer (``max(hidden_size, intermediate_size)``) and ``L`` the number of decoder layers of
    ``config``; see the module docstring for the derivation.
    """
    k = max(config.hidden_size, config.intermediate_size)
    return reduction_tol(k, config.num_hidden_layers + 1, dtype, paths)


def forward_tol(
    config, reference: torch.Tensor, dtype: torch.dtype = torch.float32, paths: int = 1
) -> float:
    """Absolute tolerance for a decoder's logits: ``forward_rtol · max|reference|``."""
    return forward_rtol(config, dtype, paths) * reference.detach().abs().max().item()


def merge_bound(
    weight: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    scale: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elementwise bound on ``|fl(W + s·B·A) - (W + s·B·A)|`` for a merge computed in ``dtype``.

    ``B·A`` is a reduction of ``r`` (the rank) terms: off by at most ``γ_r·|B|·|A|``; scaling by
    ``s`` and adding ``W`` round once each. To first order in ``u = eps/2``::

        |err| <= u · (|W| + s · (r + 2) · |B|·|A|)

    whatever the order of the operations. Returned with a factor 2 (``eps`` instead of ``u``)
    for the second-order terms, in float64.
    """
    r = lora_a.shape[0]
    w, b, a = (t.detach().abs().double() for t in (weight, lora_b, lora_a))
    return eps(dtype) * (w + abs(scale) * (r + 2) * (b @ a))


def sum_rtol(n_terms: int, dtype: torch.dtype = torch.float64, sums: int = 2) -> float:
    """Relative tolerance between ``sums`` sums of the same ``n_terms`` non-negative numbers.

    Each sum, in any order, is within ``γ_n ≈ n·u = n·eps/2`` (relative) of the exact one, so
    ``sums`` of them are within ``sums · n · eps/2`` of each other; returned with a factor 2 for
    the second-order terms: ``sums · n · eps``.
    """
    return sums * n_terms * eps(dtype)


def max_ratio(actual: torch.Tensor, expected: torch.Tensor, bound) -> float:
    """``max |actual - expected| / bound`` (in float64): below 1 means within tolerance."""
    err = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)  # 0/0 (exact) -> 0
    return ratio.max().item() if ratio.numel() else 0.0


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """Assert ``|actual - expected| <= bound`` elementwise (``bound``: float or tensor)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual.detach().double() - expected.detach().double()).abs()
    ok = bool((err <= torch.as_tensor(bound, dtype=torch.float64)).all())
    assert ok, (
        f"{what}: max |err| = {err.max().item():.3g}, "
        f"{max_ratio(actual, expected, bound):.3g} times the derived tolerance"
    )
