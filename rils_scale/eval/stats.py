"""Small statistics for ablation tables: mean ± std over seeds and a paired t-test.

``paired_t_test`` uses scipy when it is installed, else the Student t CDF through the
regularised incomplete beta function (continued fraction, Numerical Recipes' ``betacf``).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence


def _betacf(a: float, b: float, x: float, iters: int = 200, eps: float = 1e-14) -> float:
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > 1e-300 else 1e-300
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > 1e-300 else 1e-300
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Two-sided paired t-test of ``a`` vs ``b`` (same seeds). ``p`` is nan for fewer than
    two pairs or when every pair differs by the same amount (zero spread)."""
    if len(a) != len(b):
        raise ValueError("paired test needs the same number of values")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return {"mean_diff": d[0] if d else float("nan"), "t": float("nan"), "p": float("nan"), "df": n - 1}
    s = mean_std(d)
    if s["std"] < 1e-6:  # the same difference on every seed (up to float32 rounding of accuracies): t is infinite
        return {"mean_diff": s["mean"], "t": float("nan") if s["mean"] == 0 else math.copysign(math.inf, s["mean"]),
                "p": float("nan"), "df": n - 1}
    t = s["mean"] / (s["std"] / math.sqrt(n))
    try:
        from scipy import stats
        p = float(stats.t.sf(abs(t), n - 1) * 2)
    except ImportError:
        p = t_two_sided_p(t, n - 1)
    return {"mean_diff": s["mean"], "t": t, "p": p, "df": n - 1}
