"""Statistics over seeds for the ablations: means with t-distribution confidence intervals, paired differences,
and the rank AUC that says how well a score separates two classes. Pure Python, no SciPy.

    ci = interval([60.0, 70.0, 65.0])              # {"mean": 65.0, "half": 12.42, "low": 52.58, ...}
    diff = paired({0: 60.0, 1: 70.0}, {0: 55.0, 1: 58.0})   # per seed a - b, then interval() of those
    rank_auc([0.9, 0.2, 0.5], [True, False, True])  # 1.0: every positive scored above every negative
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

CONFIDENCE = 0.95  # two-sided level of every interval in the ablation summary


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``), 0 < p < 1."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and two-sided ``confidence`` interval of the mean over ``values`` (seeds), t-distribution with n - 1
    degrees of freedom: mean, std (sample standard deviation), n, half (the interval's half-width), low, high,
    min, max. With one value the spread and the interval are None."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("interval: no values")
    n, mean = len(values), statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n) if std is not None else None
    return {
        "mean": mean,
        "std": std,
        "n": n,
        "half": half,
        "low": None if half is None else mean - half,
        "high": None if half is None else mean + half,
        "min": min(values),
        "max": max(values),
    }


def paired(a: Mapping[Any, float], b: Mapping[Any, float], confidence: float = CONFIDENCE) -> dict[str, Any] | None:
    """The paired difference ``a - b`` over the keys (seeds) both have: per key, then ``interval`` of those.

    Pairing by seed removes what the two arms share (the same data order, initial student, world): the interval
    of the differences is what says whether the arms differ. None when no key is in both."""
    keys = [k for k in a if k in b]
    if not keys:
        return None
    diffs = {k: float(a[k]) - float(b[k]) for k in keys}
    return {"per_seed": diffs, **interval(list(diffs.values()), confidence)}


def rank_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """The probability that a random positive scores above a random negative, ties counting one half
    (the Mann-Whitney U over n_pos x n_neg). None when either class is empty or a score is NaN."""
    pairs = [(float(s), bool(p)) for s, p in zip(scores, positive, strict=True)]
    if any(math.isnan(s) for s, _ in pairs):
        return None
    n_pos = sum(p for _, p in pairs)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return None
    pairs.sort(key=lambda sp: sp[0])
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties (ranks start at 1)
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        rank = (i + j) / 2.0 + 1.0
        rank_sum += rank * sum(p for _, p in pairs[i : j + 1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def ratio_of_means(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """mean(numerators) / mean(denominators); None when the denominator's mean is not above zero (no gain: no
    price per point)."""
    if not numerators or not denominators:
        return None
    below = statistics.fmean(denominators)
    return statistics.fmean(numerators) / below if below > 0 else None


__all__ = [
    "CONFIDENCE",
    "incomplete_beta",
    "interval",
    "paired",
    "rank_auc",
    "ratio_of_means",
    "t_cdf",
    "t_quantile",
]
