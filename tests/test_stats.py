"""Error bars and paired tests (loram.evaluate.stats) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tolerance import sum_rtol

from loram.evaluate import stats


def test_stderr_is_lm_eval_sample_stderr():
    x = [1, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    p = 0.6
    expected = math.sqrt(p * (1 - p) * 10 / 9 / 10)  # sample variance (ddof 1) / n
    assert stats.stderr(x) == pytest.approx(expected, rel=sum_rtol(10))
    assert stats.stderr([1.0]) == 0.0


def test_wilson_interval_known_values():
    # 0 of 3: [0, z²/(n+z²)]; 3 of 3: the mirror image
    z2 = stats.Z95**2
    lo, hi = stats.wilson_interval(0, 3)
    assert lo == 0.0 and hi == pytest.approx(z2 / (3 + z2), rel=1e-12)
    lo, hi = stats.wilson_interval(3, 3)
    assert hi == 1.0 and lo == pytest.approx(3 / (3 + z2), rel=1e-12)
    # 7 of 10 (textbook value 0.3968 .. 0.8922)
    lo, hi = stats.wilson_interval(7, 10)
    assert lo == pytest.approx(0.3968, abs=5e-5) and hi == pytest.approx(0.8922, abs=5e-5)
    with pytest.raises(ValueError):
        stats.wilson_interval(4, 3)


def test_summarize_zero_score_has_an_informative_interval():
    s = stats.summarize([0.0] * 5)
    assert s.mean == 0.0 and s.stderr == 0.0 and s.interval == "wilson"
    assert s.ci_low == 0.0 and s.ci_high > 0.4  # 0/5 does not mean "certainly 0"


def test_csr_mean_stderr_combines_tasks():
    parts = {"a": [1, 0] * 25, "b": [1, 1, 1, 0] * 10, "c": [0.0] * 30}
    s = stats.mean_of_means(parts)
    ses = [stats.stderr(v) for v in parts.values()]
    assert s.mean == pytest.approx((0.5 + 0.75 + 0.0) / 3, rel=sum_rtol(50))
    assert s.stderr == pytest.approx(math.sqrt(sum(e * e for e in ses)) / 3, rel=sum_rtol(3))
    assert s.n == 120


def test_mcnemar_exact_p():
    assert stats.mcnemar_p(0, 0) == 1.0
    assert stats.mcnemar_p(5, 0) == pytest.approx(2 / 32)  # 2 * 0.5^5
    assert stats.mcnemar_p(6, 1) == pytest.approx(2 * (1 + 7) / 128)
    assert stats.mcnemar_p(3, 3) == 1.0


def test_compare_binary_uses_mcnemar_and_needs_significance():
    # the WinoGrande case: 7/10 vs 5/10
    a = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    b = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    c = stats.compare(a, b)
    assert c.test == "mcnemar" and c.p_value == 0.5  # 2 discordant pairs, both for a
    assert c.verdict == "no detectable difference (n = 10)"
    a = [1] * 40 + [0] * 60
    b = [0] * 40 + [0] * 60
    c = stats.compare(a, b)
    assert c.verdict == "better" and c.p_value < 1e-6 and c.diff == pytest.approx(0.4)
    assert stats.compare(b, a).verdict == "worse"


def test_compare_fractional_scores_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    c = stats.compare(base + 0.1 * (base < 0.9), base)  # pass@k-like fractional values
    assert c.test == "paired bootstrap" and c.verdict == "better" and c.ci_low > 0
    same = stats.compare(base, base[::-1].copy())
    assert same.verdict.startswith("no detectable difference") and same.ci_low < 0 < same.ci_high


def test_bootstrap_ppl_and_paired_ppl():
    nll = [2.0, 2.5, 3.0, 1.5, 2.2, 2.8] * 5
    tok = [10, 12, 8, 9, 11, 10] * 5
    s = stats.bootstrap_ppl(nll, tok)
    assert s.mean == pytest.approx(math.exp(sum(nll) / sum(tok)), rel=sum_rtol(30))
    assert s.ci_low < s.mean < s.ci_high
    lower = [[x - 0.5, t] for x, t in zip(nll, tok)]
    rows = [[x, t] for x, t in zip(nll, tok)]
    c = stats.compare_ppl(lower, rows)
    assert c.verdict == "better" and c.diff < 0
    assert stats.compare_ppl(rows, lower).verdict == "worse"
    assert stats.compare_ppl(rows, rows).verdict == "no detectable difference (n = 30)"


def test_results_are_reproducible():
    a, b = [0.2, 0.5, 1.0, 0.0] * 10, [0.1, 0.5, 0.5, 0.0] * 10
    assert stats.compare(a, b) == stats.compare(a, b)
