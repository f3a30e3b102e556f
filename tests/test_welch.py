"""Welch's t-test (`kdray.reporting.welch`) against references that share no code with it: Student's t density
integrated numerically (composite Simpson, the density from math.lgamma) at the Welch-Satterthwaite df computed
by plain loops; closed forms for df = 1 and 2; textbook values; and scipy where it is installed."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kdray.reporting.welch import ALPHA, student_t_quantile, student_t_sf2, welch_t_test

GRID = 200_000  # Simpson intervals (even)


def t_density(x: np.ndarray, df: float) -> np.ndarray:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))


def central_mass(t: float, df: float) -> float:
    """P(|T| <= |t|) = 2 * integral_0^|t| of the density, by composite Simpson."""
    x = np.linspace(0.0, abs(t), GRID + 1)
    f = t_density(x, df)
    h = abs(t) / GRID
    return 2 * h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


def reference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean difference, se, t, df by loops; p = 1 - P(|T| <= |t|) by integration."""
    ma = 0.0
    for x in a:
        ma += x
    ma /= len(a)
    mb = 0.0
    for x in b:
        mb += x
    mb /= len(b)
    ssa = 0.0
    for x in a:
        ssa += (x - ma) * (x - ma)
    ssb = 0.0
    for x in b:
        ssb += (x - mb) * (x - mb)
    qa = ssa / (len(a) - 1) / len(a)
    qb = ssb / (len(b) - 1) / len(b)
    se = math.sqrt(qa + qb)
    df = (qa + qb) ** 2 / (qa * qa / (len(a) - 1) + qb * qb / (len(b) - 1))
    t = (ma - mb) / se
    return {"diff": ma - mb, "se": se, "t": t, "df": df, "p": 1.0 - central_mass(t, df)}


def random_pairs(count: int, seed: int) -> list[tuple[list[float], list[float]]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        na, nb = rng.randint(2, 8), rng.randint(2, 8)
        sa, sb = rng.choice([0.002, 0.005, 0.01, 0.03]), rng.choice([0.001, 0.004, 0.02, 0.05])
        shift = rng.choice([0.0, 0.003, 0.01, 0.04])
        a = [0.70 + shift + rng.gauss(0, sa) for _ in range(na)]
        b = [0.70 + rng.gauss(0, sb) for _ in range(nb)]
        pairs.append((a, b))
    return pairs


PAIRS = random_pairs(30, seed=7)


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_against_numerical_integration_of_the_t_density(a, b):
    ref = reference(a, b)
    got = welch_t_test(a, b)
    assert got is not None
    assert got.difference == pytest.approx(ref["diff"], rel=1e-12, abs=1e-15)
    assert got.t == pytest.approx(ref["t"], rel=1e-9)
    assert got.df == pytest.approx(ref["df"], rel=1e-9)
    assert min(len(a), len(b)) - 1 <= got.df + 1e-9 and got.df <= len(a) + len(b) - 2 + 1e-9  # Welch's bounds
    assert got.p == pytest.approx(ref["p"], rel=1e-6, abs=1e-9)
    assert 0.0 <= got.p <= 1.0
    assert got.significant == (ref["p"] < 0.05)
    # the 95 % interval: centred on the difference, its half-width t* se with P(|T| <= t*) = 0.95
    assert (got.low + got.high) / 2 == pytest.approx(ref["diff"], rel=1e-9, abs=1e-12)
    t_star = (got.high - got.difference) / ref["se"]
    assert central_mass(t_star, ref["df"]) == pytest.approx(1 - ALPHA, abs=1e-8)
    # the interval excludes 0 exactly when p < 0.05 (away from the boundary)
    if abs(ref["p"] - ALPHA) > 1e-6:
        assert (got.low > 0 or got.high < 0) == (ref["p"] < ALPHA)


def test_the_welch_df_is_fractional_and_between_its_bounds():
    a, b = [0.70, 0.71, 0.73, 0.69, 0.72], [0.60, 0.70, 0.65]
    got, ref = welch_t_test(a, b), reference(a, b)
    assert got.df == pytest.approx(ref["df"], rel=1e-12)
    assert got.df != round(got.df) and 2 < got.df < 6
    assert got.p == pytest.approx(ref["p"], rel=1e-6)


def test_the_random_cases_cover_both_verdicts():
    """The random samples are not all on one side of 0.05 (else the comparisons above prove little)."""
    ps = [reference(a, b)["p"] for a, b in PAIRS]
    assert min(ps) < 0.01 and max(ps) > 0.2


# --- closed forms and textbook values ---------------------------------------------------------------------------

def test_df_two_closed_form():
    # n = 2 each, equal spread: df = 2 exactly, and P(|T| >= t) = 1 - t / sqrt(2 + t^2) for df = 2
    got = welch_t_test([1.0, 3.0], [0.0, 2.0])
    t = 1 / math.sqrt(2)
    assert got.df == pytest.approx(2.0, rel=1e-14) and got.t == pytest.approx(t, rel=1e-14)
    assert got.p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    u = 2 * 0.975 - 1  # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so t*_q = u sqrt(2 / (1 - u^2)), u = 2q - 1
    half = u * math.sqrt(2 / (1 - u * u)) * math.sqrt(2)  # t* = 4.3027, se = sqrt(2)
    assert got.high - got.difference == pytest.approx(half, rel=1e-9)


def test_df_one_when_one_group_is_constant():
    # one group without spread: a finite test, df = n_a - 1 = 1 (Cauchy: P(|T| >= t) = 1 - 2 atan(t) / pi)
    got = welch_t_test([0.0, 2.0], [5.0, 5.0])
    assert got is not None and got.df == pytest.approx(1.0, rel=1e-14) and got.t == pytest.approx(-4.0)
    assert got.p == pytest.approx(1 - 2 * math.atan(4.0) / math.pi, rel=1e-10)
    assert got.high - got.difference == pytest.approx(math.tan(math.pi * (0.975 - 0.5)), rel=1e-9)  # 12.7062


def test_one_constant_group_of_mious_gives_a_finite_result():
    got = welch_t_test([0.74, 0.76, 0.75], [0.70, 0.70, 0.70])
    ref = reference([0.74, 0.76, 0.75], [0.70, 0.70, 0.70])
    assert got is not None and all(math.isfinite(v) for v in (got.t, got.df, got.p, got.low, got.high))
    assert got.df == pytest.approx(2.0, rel=1e-6) and got.p == pytest.approx(ref["p"], rel=1e-6)


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.706204736174707), (2, 4.302652729749464),
                                              (5, 2.570581835636314), (10, 2.228138851986274),
                                              (30, 2.042272456301238), (1000, 1.962339080826408)])
def test_t_quantiles_of_the_tables(df, quantile):
    assert student_t_quantile(0.975, df) == pytest.approx(quantile, rel=1e-9)
    assert student_t_sf2(quantile, df) == pytest.approx(0.05, rel=1e-9)


def test_textbook_example():
    """Wikipedia, "Welch's t-test", example 1 (equal sizes, similar variances): t = -2.46, df = 25.0, p = 0.021."""
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    got = welch_t_test(a1, a2)
    assert round(got.t, 2) == -2.46 and round(got.df, 1) == 25.0 and round(got.p, 3) == 0.021
    assert got.p == pytest.approx(reference(a1, a2)["p"], rel=1e-6)


# --- edge cases ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b"), [([], [0.7, 0.8]), ([0.7], [0.7, 0.8]), ([0.7, 0.8], [0.75]), ([0.7], [0.8])])
def test_fewer_than_two_values_gives_none(a, b):
    assert welch_t_test(a, b) is None


@pytest.mark.parametrize(("a", "b"), [([0.5, 0.5, 0.5], [0.25, 0.25]), ([0.1, 0.1, 0.1], [0.2, 0.2, 0.2]),
                                      ([0.7, 0.7, 0.7], [0.71, 0.71, 0.71]), ([0.7, 0.7], [0.7, 0.7])])
def test_no_spread_in_both_groups_gives_none(a, b):
    # [0.1] * 3 has a mean of 0.10000000000000002 in floats: the spurious spread (~1e-34) is no seed noise
    assert welch_t_test(a, b) is None


def test_identical_groups_give_p_one():
    a = [0.71, 0.73, 0.72, 0.70]
    got = welch_t_test(a, list(a))
    assert got.difference == 0 and got.t == 0 and got.p == 1.0 and not got.significant
    assert got.low == -got.high and got.low < 0


def test_a_huge_t_gives_a_tiny_but_non_negative_p():
    got = welch_t_test([1000.0, 1001.0], [0.0, 1.0])  # df = 2, t = 1000 / sqrt(0.5)
    s = math.sqrt(2 + got.t ** 2)
    assert got.df == pytest.approx(2.0) and got.t == pytest.approx(1000 / math.sqrt(0.5))
    assert got.p == pytest.approx(2 / (s * (s + got.t)), rel=1e-9)  # 1 - t/s without the cancellation
    huge = welch_t_test([1.0, 1.0 + 1e-9, 1.0 - 1e-9], [0.0, 1e-9, -1e-9])
    assert huge.t > 1e8 and 0.0 <= huge.p < 1e-15 and huge.significant
    assert welch_t_test([0.0, 1e-9, -1e-9], [1.0, 1.0 + 1e-9, 1.0 - 1e-9]).p == huge.p  # symmetric


def test_sign_and_symmetry():
    a, b = [0.74, 0.76, 0.75, 0.77], [0.72, 0.70, 0.74]
    ab, ba = welch_t_test(a, b), welch_t_test(b, a)
    assert ab.difference > 0 and ab.t > 0 and ba.t == pytest.approx(-ab.t) and ba.p == pytest.approx(ab.p)
    assert ba.low == pytest.approx(-ab.high) and ba.high == pytest.approx(-ab.low)


# --- scipy as a second reference ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
@pytest.mark.parametrize(("a", "b"), PAIRS[:15] + [([1000.0, 1001.0], [0.0, 1.0]),
                                                   ([0.74, 0.76, 0.75], [0.70, 0.70, 0.70])])
def test_against_scipy(a, b):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.ttest_ind(a, b, equal_var=False)
    got = welch_t_test(a, b)
    assert got.t == pytest.approx(float(expected.statistic), rel=1e-9)
    assert got.df == pytest.approx(float(expected.df), rel=1e-9)
    assert got.p == pytest.approx(float(expected.pvalue), rel=1e-8, abs=1e-300)
    interval = expected.confidence_interval(0.95)
    assert got.low == pytest.approx(float(interval.low), rel=1e-8, abs=1e-12)
    assert got.high == pytest.approx(float(interval.high), rel=1e-8, abs=1e-12)
