"""Welch's t-test: does the difference of two groups' means exceed what their spread (here: seed noise) explains?

For samples a (n_a values, mean m_a, sample variance v_a, ddof=1) and b:

    se = sqrt(v_a/n_a + v_b/n_b)                       standard error of m_a - m_b
    t  = (m_a - m_b) / se
    df = se^4 / ((v_a/n_a)^2/(n_a-1) + (v_b/n_b)^2/(n_b-1))     Welch-Satterthwaite degrees of freedom
    p  = P(|T_df| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)          two-sided; I is the regularized incomplete beta

and the 95 % interval of the difference, (m_a - m_b) ± t*_{0.975, df} · se. Welch, B. L. (1947), "The
generalization of Student's problem when several different population variances are involved", Biometrika 34.
The incomplete beta is evaluated by its continued fraction (modified Lentz), as in Press et al., Numerical
Recipes, §6.4. Plain Python floats: a report compares a handful of seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05


@dataclass(frozen=True)
class WelchTest:
    difference: float  # m_a - m_b, in the samples' unit
    t: float
    df: float
    p: float  # two-sided
    low: float  # the 95 % interval of the difference
    high: float

    @property
    def significant(self) -> bool:
        """p < 0.05: the difference exceeds what the groups' spread explains."""
        return self.p < ALPHA


def welch_t_test(a: list[float], b: list[float]) -> WelchTest | None:
    """The test of mean(a) - mean(b); None when it is undefined: a group with fewer than 2 values, or no spread
    in either group (every seed gave the same value: nothing to measure the noise by)."""
    if len(a) < 2 or len(b) < 2 or (min(a) == max(a) and min(b) == max(b)):  # float rounding aside
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    qa, qb = va / len(a), vb / len(b)
    se2 = qa + qb
    if se2 <= 0 or not math.isfinite(se2):
        return None
    se = math.sqrt(se2)
    df = se2 ** 2 / (qa ** 2 / (len(a) - 1) + qb ** 2 / (len(b) - 1))
    t = (ma - mb) / se
    p = student_t_sf2(t, df)
    half = student_t_quantile(1 - ALPHA / 2, df) * se
    return WelchTest(ma - mb, t, df, p, ma - mb - half, ma - mb + half)


def student_t_sf2(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` (> 0) degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return min(1.0, regularized_beta(df / (df + t * t), df / 2, 0.5))


def student_t_cdf(t: float, df: float) -> float:
    half_tail = student_t_sf2(t, df) / 2
    return 1 - half_tail if t > 0 else half_tail


def student_t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, 0 < q < 1, by bisection on the CDF (monotone)."""
    low, high = -1.0, 1.0
    while student_t_cdf(low, df) > q:
        low *= 2
    while student_t_cdf(high, df) < q:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if student_t_cdf(mid, df) < q:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, abs(mid)):
            break
    return (low + high) / 2


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1, a, b > 0."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):  # the continued fraction converges fast here; else use the symmetry
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1 - math.exp(log_front) * _beta_fraction(1 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h
