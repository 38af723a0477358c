"""Error bars and paired comparisons for evaluation scores (standard library + numpy).

Everything works on per-document values, so that two arms evaluated on the same documents can
be compared document by document:

* ``summarize(values)``: mean, standard error (sample standard deviation / sqrt(n), as
  lm-eval) and a 95% interval: the Wilson score interval for scores in [0, 1] (it stays
  informative at 0/n and n/n, where the standard error is 0), else mean ± 1.96 se.
* ``mean_of_means(parts)``: the CSR mean (unweighted mean of task accuracies) and its standard
  error sqrt(sum se_i²) / k (the tasks' documents are independent).
* ``bootstrap_ppl(nll, tokens)``: perplexity exp(sum nll / sum tokens) with a percentile
  bootstrap interval over documents.
* ``compare(a, b)``: a paired test over the same documents. Binary per-document scores use the
  exact McNemar test (a two-sided binomial test on the discordant pairs); any other score a
  paired bootstrap of the difference (stratified by task for a mean of several tasks). The
  verdict is "better" / "worse" only when the difference is significant at ``alpha``, else
  "no detectable difference (n = ...)".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 1234


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation (ddof 1) / sqrt(n); 0 if n < 2."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return 0.0
    return float(x.std(ddof=1) / math.sqrt(x.size))


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (``successes`` may be fractional, e.g. a sum of
    per-problem pass@k values)."""
    if n <= 0:
        raise ValueError(f"need n >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds at 0/n and n/n
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def is_binary(values: Sequence[float]) -> bool:
    """Every value is 0 or 1."""
    return all(v in (0, 1) for v in values)


@dataclass(frozen=True)
class Summary:
    """A score over documents with its error bar."""

    mean: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int
    interval: str  # "wilson" | "normal" | "bootstrap"

    def to_dict(self) -> dict:
        """JSON-serializable form."""
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Mean, standard error and 95% interval of per-document scores."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarize")
    mean, se = float(x.mean()), stderr(x)
    if np.all((x >= 0) & (x <= 1)):
        lo, hi = wilson_interval(float(x.sum()), int(x.size))
        return Summary(mean, se, lo, hi, int(x.size), "wilson")
    return Summary(mean, se, mean - Z95 * se, mean + Z95 * se, int(x.size), "normal")


def mean_of_means(parts: Mapping[str, Sequence[float]]) -> Summary:
    """Unweighted mean of per-part means (e.g. the CSR mean over six tasks) and its standard
    error sqrt(sum se_i²) / k; interval mean ± 1.96 se clipped to [0, 1] for scores."""
    if not parts:
        raise ValueError("no parts to average")
    means = [float(np.mean(v)) for v in parts.values()]
    ses = [stderr(v) for v in parts.values()]
    k = len(means)
    mean = sum(means) / k
    se = math.sqrt(sum(s * s for s in ses)) / k
    n = sum(len(v) for v in parts.values())
    lo, hi = mean - Z95 * se, mean + Z95 * se
    if all(0 <= x <= 1 for v in parts.values() for x in v):
        lo, hi = max(0.0, lo), min(1.0, hi)
    return Summary(mean, se, lo, hi, n, "normal")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def bootstrap_ppl(
    nll: Sequence[float],
    tokens: Sequence[int],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Summary:
    """Perplexity exp(sum nll / sum tokens) over documents, with a 95% percentile bootstrap
    interval (documents resampled with replacement); ``stderr`` is the bootstrap standard
    deviation of the perplexity."""
    nll_a, tok_a = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    if nll_a.shape != tok_a.shape or nll_a.size == 0:
        raise ValueError("nll and tokens need the same, non-zero length")
    if np.any(tok_a <= 0):
        raise ValueError("every document needs at least one scored token")
    ppl = float(np.exp(min(nll_a.sum() / tok_a.sum(), 50.0)))
    idx = _rng(seed).integers(0, nll_a.size, size=(resamples, nll_a.size))
    boot = np.exp(np.minimum(nll_a[idx].sum(1) / tok_a[idx].sum(1), 50.0))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Summary(ppl, float(boot.std(ddof=1)), float(lo), float(hi), int(nll_a.size), "bootstrap")


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of arm A against arm B on the same documents."""

    diff: float  # A - B (for perplexity: lower is better)
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    test: str  # "mcnemar" | "paired bootstrap"
    verdict: str  # "better" | "worse" | "no detectable difference (n = ...)"

    def to_dict(self) -> dict:
        """JSON-serializable form."""
        return asdict(self)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b, c = discordant pairs (A right / B wrong and the
    reverse); binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _verdict(diff: float, p: float, n: int, lower_is_better: bool, alpha: float) -> str:
    if p < alpha and diff != 0:
        better = diff < 0 if lower_is_better else diff > 0
        return "better" if better else "worse"
    return f"no detectable difference (n = {n})"


def _boot_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value for H0: difference = 0 (percentile method)."""
    lo = (np.sum(diffs <= 0) + 1) / (diffs.size + 1)
    hi = (np.sum(diffs >= 0) + 1) / (diffs.size + 1)
    return float(min(1.0, 2 * min(lo, hi)))


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    alpha: float = ALPHA,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Comparison:
    """Paired comparison of per-document scores (higher is better) of two arms, same order."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired scores need the same non-zero length, got {x.size} and {y.size}")
    n = int(x.size)
    diff = float(x.mean() - y.mean())
    if is_binary(x) and is_binary(y):
        b_ = int(np.sum((x == 1) & (y == 0)))
        c_ = int(np.sum((x == 0) & (y == 1)))
        p = mcnemar_p(b_, c_)
        d = x - y
        se = stderr(d)
        return Comparison(
            diff,
            diff - Z95 * se,
            diff + Z95 * se,
            p,
            n,
            "mcnemar",
            _verdict(diff, p, n, False, alpha),
        )
    return compare_groups({"": x}, {"": y}, alpha=alpha, resamples=resamples, seed=seed)


def compare_groups(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    *,
    statistic: Callable[[Mapping[str, np.ndarray]], float] | None = None,
    lower_is_better: bool = False,
    alpha: float = ALPHA,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Comparison:
    """Paired bootstrap over documents, resampled within each group (task), of
    ``statistic(A) - statistic(B)``; default statistic: the unweighted mean of group means.

    Each group's arrays hold one row per document (same documents, same order, in A and B);
    rows may be vectors (e.g. ``[nll, tokens]`` for perplexity)."""
    if set(a) != set(b) or not a:
        raise ValueError(f"groups differ: {sorted(a)} vs {sorted(b)}")
    xa = {k: np.asarray(a[k], dtype=float) for k in a}
    xb = {k: np.asarray(b[k], dtype=float) for k in a}
    for k in xa:
        if xa[k].shape != xb[k].shape or len(xa[k]) == 0:
            raise ValueError(f"group {k!r}: paired scores need the same non-zero length")
    stat = statistic or (lambda g: float(np.mean([v.mean() for v in g.values()])))
    diff = stat(xa) - stat(xb)
    rng = _rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        idx = {k: rng.integers(0, len(v), size=len(v)) for k, v in xa.items()}
        draws[i] = stat({k: v[idx[k]] for k, v in xa.items()}) - stat(
            {k: v[idx[k]] for k, v in xb.items()}
        )
    lo, hi = np.percentile(draws, [2.5, 97.5])
    p = _boot_p(draws)
    n = sum(len(v) for v in xa.values())
    return Comparison(
        float(diff),
        float(lo),
        float(hi),
        p,
        n,
        "paired bootstrap",
        _verdict(float(diff), p, n, lower_is_better, alpha),
    )


def ppl_statistic(groups: Mapping[str, np.ndarray]) -> float:
    """Perplexity of one group of ``[nll, tokens]`` rows (for ``compare_groups``)."""
    (rows,) = groups.values()
    return float(np.exp(min(rows[:, 0].sum() / rows[:, 1].sum(), 50.0)))


def compare_ppl(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], **kwargs) -> Comparison:
    """Paired bootstrap of the perplexity difference A - B over documents (rows
    ``[nll, tokens]``; lower is better)."""
    return compare_groups(
        {"ppl": a}, {"ppl": b}, statistic=ppl_statistic, lower_is_better=True, **kwargs
    )
