"""Bootstrap CIs, paired TOST, log-K interpolation, effective compression and budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from backend.circuits.results import Stat
from backend.circuits.stats import (
    bootstrap_ci,
    effective_budget,
    effective_compression,
    effective_budget_plan,
    effective_budget_tests,
    interpolate_k_for_value,
    paired_spearman_difference,
    paired_tost,
    summarize,
)


# --- bootstrap_ci / summarize -------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    x = np.random.default_rng(1).exponential(size=50)
    lo, hi = bootstrap_ci(x, seed=3)
    assert isinstance(lo, float) and isinstance(hi, float)
    assert lo < x.mean() < hi
    assert bootstrap_ci(x, seed=3) == (lo, hi)
    assert bootstrap_ci(list(x), seed=3) == (lo, hi)
    assert bootstrap_ci(x, seed=4) != (lo, hi)


def test_bootstrap_ci_narrows_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (20, 200, 2000):
        lo, hi = bootstrap_ci(rng.normal(size=n), seed=0)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # width scales like 1/sqrt(n): each 10x in n shrinks it by about sqrt(10)
    assert widths[0] / widths[2] == pytest.approx(10.0, rel=0.3)


def test_bootstrap_ci_matches_normal_theory():
    x = np.random.default_rng(5).normal(loc=2.0, scale=3.0, size=1000)
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.10)
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.1 * half)


def test_bootstrap_ci_level_orders_widths():
    x = np.random.default_rng(6).normal(size=100)
    lo90, hi90 = bootstrap_ci(x, level=0.90)
    lo99, hi99 = bootstrap_ci(x, level=0.99)
    assert lo99 < lo90 < hi90 < hi99


def test_bootstrap_ci_single_and_empty():
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_summarize_matches_numpy():
    x = np.random.default_rng(7).gamma(2.0, size=40)
    s = summarize(x, seed=1)
    assert isinstance(s, Stat)
    assert s.mean == pytest.approx(float(np.mean(x)), rel=1e-12)
    assert s.std == pytest.approx(float(np.std(x, ddof=1)), rel=1e-12)
    assert s.ci95 == bootstrap_ci(x, level=0.95, seed=1)
    assert isinstance(s.mean, float) and isinstance(s.std, float)


def test_summarize_single_value():
    s = summarize([1.5])
    assert (s.mean, s.std, s.ci95) == (1.5, 0.0, (1.5, 1.5))


# --- paired_tost --------------------------------------------------------------------------


def test_paired_tost_equivalent_when_diffs_small():
    rng = np.random.default_rng(0)
    b = rng.normal(1.0, 0.5, size=60)
    a = b + rng.normal(0.0, 0.01, size=60)
    r = paired_tost(a, b, margin=0.1)
    assert r["equivalent"] is True
    assert r["p_value"] < 0.05
    assert r["n"] == 60
    assert r["margin"] == 0.1
    assert r["mean_diff"] == pytest.approx(float(np.mean(a - b)), rel=1e-12)


def test_paired_tost_not_equivalent_when_shifted():
    rng = np.random.default_rng(1)
    b = rng.normal(1.0, 0.5, size=60)
    a = b + rng.normal(0.5, 0.01, size=60)
    r = paired_tost(a, b, margin=0.1)
    assert r["equivalent"] is False
    assert r["p_value"] > 0.5
    assert r["mean_diff"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("shift", [0.0, 0.05, -0.08, 0.3])
def test_paired_tost_matches_scipy_one_sided_tests(shift):
    rng = np.random.default_rng(11)
    b = rng.normal(size=30)
    a = b + rng.normal(shift, 0.1, size=30)
    d, margin = a - b, 0.1
    r = paired_tost(list(a), list(b), margin)
    p_upper = sps.ttest_1samp(d - margin, 0.0, alternative="less").pvalue
    p_lower = sps.ttest_1samp(d + margin, 0.0, alternative="greater").pvalue
    assert r["p_upper"] == pytest.approx(p_upper, rel=1e-9, abs=1e-300)
    assert r["p_lower"] == pytest.approx(p_lower, rel=1e-9, abs=1e-300)
    assert r["p_value"] == pytest.approx(max(p_upper, p_lower), rel=1e-9, abs=1e-300)
    assert r["equivalent"] == (max(p_upper, p_lower) < 0.05)


def test_paired_tost_zero_variance():
    b = [0.3, 0.8, 1.2, 2.0]
    inside = paired_tost([v + 0.05 for v in b], b, margin=0.1)
    assert inside["p_value"] == 0.0 and inside["equivalent"] is True
    outside = paired_tost([v + 0.2 for v in b], b, margin=0.1)
    assert outside["p_value"] == 1.0 and outside["equivalent"] is False
    same = paired_tost(b, b, margin=0.1)
    assert same["p_value"] == 0.0 and same["mean_diff"] == 0.0


def test_paired_tost_rejects_bad_input():
    with pytest.raises(ValueError):
        paired_tost([1.0, 2.0], [1.0], margin=0.1)
    with pytest.raises(ValueError):
        paired_tost([1.0, 2.0], [1.0, 2.0], margin=0.0)
    with pytest.raises(ValueError):
        paired_tost([1.0], [1.0], margin=0.1)


# --- interpolate_k_for_value --------------------------------------------------------------


def test_interpolate_exact_grid_hits():
    ks, vals = [10, 100, 1000], [1.0, 0.5, 0.2]
    assert interpolate_k_for_value(ks, vals, 1.0) == 10.0
    assert interpolate_k_for_value(ks, vals, 0.5) == 100.0
    assert interpolate_k_for_value(ks, vals, 0.2) == 1000.0


def test_interpolate_log_linear():
    assert interpolate_k_for_value([10, 100], [1.0, 0.0], 0.5) == pytest.approx(
        math.sqrt(10 * 100), rel=1e-12
    )
    # a quarter of the way down the segment -> a quarter of the way in log K
    k = interpolate_k_for_value([10, 1000], [2.0, 1.0], 1.75)
    assert k == pytest.approx(10 ** 1.5, rel=1e-12)
    # second segment of a three-point curve
    k = interpolate_k_for_value(np.array([50, 100, 400]), np.array([1.2, 1.0, 0.6]), 0.8)
    assert k == pytest.approx(200.0, rel=1e-12)
    assert isinstance(k, float)


def test_interpolate_first_point_already_below():
    assert interpolate_k_for_value([10, 100], [0.3, 0.1], 0.5) == 10.0


def test_interpolate_never_reached():
    assert interpolate_k_for_value([10, 100, 1000], [1.0, 0.8, 0.6], 0.5) is None


def test_interpolate_running_min_handles_noise():
    # the bump at K=100 (0.9 > 0.7) is flattened to 0.7 by the running minimum
    ks, vals = [10, 100, 1000], [0.7, 0.9, 0.3]
    # target 0.8 is first reached at K=10 on the monotone curve, not between 100 and 1000
    assert interpolate_k_for_value(ks, vals, 0.8) == 10.0
    # target 0.5 lies on the segment 100 (0.7 after the min) -> 1000 (0.3): halfway in log K
    assert interpolate_k_for_value(ks, vals, 0.5) == pytest.approx(10 ** 2.5, rel=1e-12)
    # a later rise does not undo an earlier hit
    assert interpolate_k_for_value([10, 100, 1000], [1.0, 0.4, 0.9], 0.4) == 100.0


def test_interpolate_rejects_bad_grid():
    with pytest.raises(ValueError):
        interpolate_k_for_value([100, 10], [1.0, 0.5], 0.7)
    with pytest.raises(ValueError):
        interpolate_k_for_value([0, 10], [1.0, 0.5], 0.7)
    with pytest.raises(ValueError):
        interpolate_k_for_value([10, 100], [1.0], 0.7)


# --- effective compression, effective budget, equivalence at the budget ---------------------


RANDOM_KS = [100, 1000, 10000]
RANDOM_KL = [1.0, 0.5, 0.1]


def test_effective_compression_on_hand_made_curve():
    assert effective_compression(0.5, 50, RANDOM_KS, RANDOM_KL) == pytest.approx(20.0)
    # KL 0.3 is halfway between 0.5 (K=1000) and 0.1 (K=10000): K = 10^3.5
    assert effective_compression(0.3, 100, RANDOM_KS, RANDOM_KL) == pytest.approx(
        10 ** 3.5 / 100, rel=1e-12
    )
    assert effective_compression(0.05, 100, RANDOM_KS, RANDOM_KL) is None


def test_effective_budget():
    base_ks, base_kl = [50, 100, 200, 400, 800], [1.33, 1.13, 0.85, 0.6, 0.4]
    assert effective_budget(0.85, base_ks, base_kl) == pytest.approx(200.0)
    k = effective_budget(1.0, base_ks, base_kl)
    t = (1.13 - 1.0) / (1.13 - 0.85)
    assert k == pytest.approx(100 * 2 ** t, rel=1e-12)
    assert effective_budget(0.1, base_ks, base_kl) is None


def _t3_cdf(t: float) -> float:
    """Student's t CDF with 3 degrees of freedom, in closed form (no scipy)."""
    x = t / math.sqrt(3)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_paired_tost_against_a_hand_computed_example():
    # d = a - b = [-0.05, 0.1, -0.05, 0.1]: mean 0.025, sd sqrt(0.0225 / 3), se = sd / 2, df = 3.
    a, b = [1.0, 1.2, 0.9, 1.1], [1.05, 1.1, 0.95, 1.0]
    se = math.sqrt(0.0225 / 3) / 2
    p_lower = 1 - _t3_cdf((0.025 + 0.2) / se)   # H0: mean(d) <= -0.2
    p_upper = _t3_cdf((0.025 - 0.2) / se)       # H0: mean(d) >= +0.2
    r = paired_tost(a, b, margin=0.2)
    assert r["mean_diff"] == pytest.approx(0.025, abs=1e-12)
    assert r["p_lower"] == pytest.approx(p_lower, rel=1e-9)
    assert r["p_upper"] == pytest.approx(p_upper, rel=1e-9)
    assert r["p_value"] == pytest.approx(max(p_lower, p_upper), rel=1e-9)
    assert 0.01 < r["p_value"] < 0.05 and r["equivalent"] is True
    # With a margin of 0.1 the upper test fails: (0.025 - 0.1) / se = -1.73, p ~ 0.09.
    narrow = paired_tost(a, b, margin=0.1)
    assert narrow["p_upper"] == pytest.approx(_t3_cdf((0.025 - 0.1) / se), rel=1e-9)
    assert narrow["equivalent"] is False


def test_effective_budget_plan_reads_k_prime_and_the_claimed_budget():
    base_ks, base_kl = [50, 100, 200], [1.33, 1.13, 0.85]
    plan = effective_budget_plan(1.0, 50, base_ks, base_kl)
    t = (1.13 - 1.0) / (1.13 - 0.85)
    assert plan["k_equivalent"] == pytest.approx(100 * 2 ** t)
    assert plan["k_base"] == round(100 * 2 ** t) == 138
    assert plan["k_claimed"] == 75 and plan["k_equivalent_bound"] == "interpolated"
    worse = effective_budget_plan(1.5, 100, base_ks, base_kl)       # worse than the base at 50
    assert worse["k_equivalent"] == 50.0 and worse["k_base"] == 50 and worse["k_equivalent_bound"] == "at_most"
    assert worse["k_claimed"] == 150
    better = effective_budget_plan(0.5, 50, base_ks, base_kl)      # better than the base anywhere
    assert better["k_equivalent"] is None and better["k_base"] is None
    assert better["k_equivalent_bound"] == "beyond_grid"


def test_effective_budget_tests_run_the_tost_at_the_planned_budgets():
    a, b = [1.0, 1.2, 0.9, 1.1], [1.05, 1.1, 0.95, 1.0]
    base = {138: b, 75: [x + 0.3 for x in b]}
    plan = {"k_equivalent": 137.9, "k_equivalent_bound": "interpolated", "k_base": 138, "k_claimed": 75}
    r = effective_budget_tests(a, base, plan, margin=0.2)
    direct = paired_tost(a, b, 0.2)
    assert r["base_kl_at_k_base"] == pytest.approx(float(np.mean(b)))
    for f in ("mean_diff", "p_lower", "p_upper", "p_value", "equivalent"):
        assert r[f] == direct[f]
    assert r["claimed_mean_diff"] == pytest.approx(0.025 - 0.3)
    assert r["claimed_equivalent"] is False and r["margin"] == 0.2 and r["n"] == 4
    none = effective_budget_tests(a, base, {**plan, "k_equivalent": None, "k_base": None}, margin=0.2)
    assert none["p_value"] is None and none["base_kl_at_k_base"] is None
    assert none["claimed_p_value"] is not None


def test_paired_spearman_difference_matches_scipy_and_brackets_truth():
    """The point difference is scipy's rho(a) - rho(b); a ranking that is the truth itself beats
    a noisy one with a CI above 0; two equal rankings give exactly 0 on every resample."""
    rng = np.random.default_rng(1)
    truth = rng.normal(size=200)
    good, noisy = truth + 0.1 * rng.normal(size=200), truth + 1.0 * rng.normal(size=200)
    diff, lo, hi = paired_spearman_difference(good, noisy, truth, n_boot=500)
    expected = sps.spearmanr(good, truth).statistic - sps.spearmanr(noisy, truth).statistic
    assert diff == pytest.approx(expected, abs=1e-12)
    assert 0 < lo < diff < hi
    assert paired_spearman_difference(noisy, noisy, truth, n_boot=50) == (0.0, 0.0, 0.0)
    # ties (as resampling makes) are ranked like scipy does
    tied = np.round(truth, 0)
    assert paired_spearman_difference(tied, noisy, truth)[0] == pytest.approx(
        sps.spearmanr(tied, truth).statistic - sps.spearmanr(noisy, truth).statistic, abs=1e-12)
    with pytest.raises(ValueError):
        paired_spearman_difference([1.0, 2.0], [2.0, 1.0], [1.0, 2.0])
