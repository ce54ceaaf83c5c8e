"""Statistics of per-prompt results: bootstrap CIs, paired TOST, effective compression and budget,
and the paired difference of two rankings' Spearman correlations.

DESIGN.md section 5, "Evaluation" (mean, std, bootstrap 95% CI of a per-prompt quantity) and
"Headline numbers" (effective compression, effective budget backed by a paired TOST at the
budgets the base method was actually run at).

Pure numpy/scipy. Every function accepts lists or 1-D numpy arrays and returns Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps

from backend.circuits.results import Stat

ArrayLike = Sequence[float] | np.ndarray


def _as_1d(values: ArrayLike, name: str = "values") -> np.ndarray:
    """``values`` as a 1-D float64 array; raises ValueError when empty or not 1-D."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    return x


def bootstrap_ci(
    values: ArrayLike, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` ([n]).

    One resample matrix of indices [n_boot, n] is drawn with ``np.random.default_rng(seed)``;
    the CI is the ((1-level)/2, (1+level)/2) quantiles of its row means. n=1 gives (v, v).
    """
    x = _as_1d(values)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if x.size == 1:
        v = float(x[0])
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_spearman_difference(
    a: ArrayLike, b: ArrayLike, truth: ArrayLike, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """rho(a, truth) - rho(b, truth), Spearman, with a paired percentile bootstrap CI over items.

    a, b, truth: [n] two rankings of the same n items and the quantity they rank. Each of the
    n_boot resamples draws items with replacement and ranks all three on the same draw (average
    ranks for the ties the draw makes), so the CI reflects that a and b are judged on the same
    items. Returns (difference, lo, hi).
    """
    x, y, t = _as_1d(a, "a"), _as_1d(b, "b"), _as_1d(truth, "truth")
    if not x.shape == y.shape == t.shape:
        raise ValueError(f"a, b and truth must have the same length, got {x.size}, {y.size}, {t.size}")
    if x.size < 3:
        raise ValueError("a Spearman difference needs at least 3 items")

    def rho(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Row-wise Spearman of [m, n] arrays (0 where a row is constant)."""
        ru, rv = sps.rankdata(u, axis=-1), sps.rankdata(v, axis=-1)
        ru, rv = ru - ru.mean(-1, keepdims=True), rv - rv.mean(-1, keepdims=True)
        den = np.sqrt((ru ** 2).sum(-1) * (rv ** 2).sum(-1))
        return np.divide((ru * rv).sum(-1), den, out=np.zeros_like(den), where=den > 0)

    diff = float(rho(x[None], t[None])[0] - rho(y[None], t[None])[0])
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    boot = rho(x[idx], t[idx]) - rho(y[idx], t[idx])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return diff, float(lo), float(hi)


def summarize(values: ArrayLike, seed: int = 0) -> Stat:
    """Mean, sample std (ddof=1; 0 for n=1) and bootstrap 95% CI of a per-prompt quantity."""
    x = _as_1d(values)
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return Stat(mean=float(x.mean()), std=std, ci95=bootstrap_ci(x, level=0.95, seed=seed))


def paired_tost(a: ArrayLike, b: ArrayLike, margin: float) -> dict:
    """Paired two one-sided t-tests for equivalence of ``a`` and ``b`` (same prompts, [n] each).

    d = a - b. H0: |mean(d)| >= margin, rejected when both one-sided tests reject:
    ``p_lower`` tests H0: mean(d) <= -margin against mean(d) > -margin, ``p_upper`` tests
    H0: mean(d) >= margin against mean(d) < margin (t-tests, df = n-1). The TOST p-value is
    the larger of the two; ``equivalent`` is p < 0.05. When every d is identical (zero
    variance, up to the rounding of a - b) p is 0 if |d| < margin, else 1.

    Returns {"mean_diff", "margin", "p_value", "p_lower", "p_upper", "equivalent", "n"}.
    """
    x = _as_1d(a, "a")
    y = _as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same length, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError("paired_tost needs at least 2 paired values")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    d = x - y
    n = int(d.size)
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    # differences equal up to the rounding of a - b count as zero variance
    scale = max(1.0, float(np.max(np.abs(x))), float(np.max(np.abs(y))))
    if float(np.ptp(d)) <= 64 * np.finfo(np.float64).eps * scale:
        inside = abs(mean) < margin
        p_lower = 0.0 if mean > -margin else 1.0
        p_upper = 0.0 if mean < margin else 1.0
        p = 0.0 if inside else 1.0
    else:
        se = sd / math.sqrt(n)
        df = n - 1
        p_lower = float(sps.t.sf((mean + margin) / se, df))
        p_upper = float(sps.t.cdf((mean - margin) / se, df))
        p = max(p_lower, p_upper)
    return {
        "mean_diff": mean,
        "margin": float(margin),
        "p_value": float(p),
        "p_lower": float(p_lower),
        "p_upper": float(p_upper),
        "equivalent": bool(p < 0.05),
        "n": n,
    }


def interpolate_k_for_value(ks: ArrayLike, values: ArrayLike, target: float) -> float | None:
    """The budget K at which a (roughly decreasing) curve ``values`` over ``ks`` reaches ``target``.

    ``ks`` ([m], strictly increasing, > 0) and ``values`` ([m]) are first made monotone by a
    running minimum (a larger budget is never credited with a worse value than a smaller one).
    The first K whose monotone value is <= target is found; the answer is interpolated
    linearly in log K between it and the grid point before. If the first point already
    reaches the target the answer is ``ks[0]`` (read: "at most ks[0]"); if no point reaches
    it, None.
    """
    k = _as_1d(ks, "ks")
    v = _as_1d(values, "values")
    if k.shape != v.shape:
        raise ValueError(f"ks and values must have the same length, got {k.size} and {v.size}")
    if np.any(k <= 0) or np.any(np.diff(k) <= 0):
        raise ValueError("ks must be positive and strictly increasing")
    mono = np.minimum.accumulate(v)
    hits = np.nonzero(mono <= target)[0]
    if hits.size == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return float(k[0])
    hi_v, lo_v = mono[i - 1], mono[i]  # hi_v > target >= lo_v, so hi_v > lo_v
    t = (hi_v - target) / (hi_v - lo_v)
    if t >= 1.0:
        return float(k[i])
    log_k = math.log(k[i - 1]) + t * (math.log(k[i]) - math.log(k[i - 1]))
    return float(math.exp(log_k))


def effective_compression(
    method_kl_at_k: float, k: float, random_ks: ArrayLike, random_kl: ArrayLike
) -> float | None:
    """K_random needed to reach a method's KL at budget ``k``, divided by ``k``.

    K_random is interpolated on the random-selection KL-vs-K curve; None when random
    selection never reaches the method's KL on its grid.
    """
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k}")
    k_random = interpolate_k_for_value(random_ks, random_kl, method_kl_at_k)
    return None if k_random is None else float(k_random / k)


def effective_budget(
    method_a_kl_at_k: float, base_ks: ArrayLike, base_kl: ArrayLike
) -> float | None:
    """The budget K' at which the base method's KL-vs-K curve matches method A's KL at K."""
    return interpolate_k_for_value(base_ks, base_kl, method_a_kl_at_k)


def effective_budget_plan(
    method_a_kl_at_k: float, k: int, base_ks: ArrayLike, base_kl: ArrayLike, ratio: float = 1.5
) -> dict:
    """The base-method budgets an effective-budget test must *run* for method A at budget ``k``.

    k_equivalent: K' where the base method's mean-KL curve over ``base_ks`` reaches A's mean KL
    (`effective_budget`); k_equivalent_bound: "interpolated", "at_most" (the base's smallest K
    already does better: K' <= base_ks[0]) or "beyond_grid" (never reached: K' is None);
    k_base = round(K') (None with K'); k_claimed = round(ratio * k), the paper's claim
    (FAP-Synergy at K=50 matches FAP at K=75).
    """
    k_eq = effective_budget(method_a_kl_at_k, base_ks, base_kl)
    if k_eq is None:
        bound = "beyond_grid"
    elif float(np.asarray(base_kl, dtype=np.float64)[0]) < method_a_kl_at_k:
        bound = "at_most"
    else:
        bound = "interpolated"
    return {"k_equivalent": k_eq, "k_equivalent_bound": bound,
            "k_base": None if k_eq is None else max(1, int(round(k_eq))),
            "k_claimed": max(1, int(round(ratio * k)))}


def effective_budget_tests(
    a_per_prompt: ArrayLike, base_per_prompt_by_k: Mapping[int, ArrayLike], plan: dict, margin: float
) -> dict:
    """Paired TOSTs of method A's per-prompt KL at K against the base method's per-prompt KL at
    the budgets of ``plan`` (`effective_budget_plan`), which must be in ``base_per_prompt_by_k``.

    Returns the plan plus "margin", "n" and, for the test at k_base: "base_kl_at_k_base" (the
    base's mean KL there), "mean_diff" (A - base), "p_lower", "p_upper", "p_value" (the TOST p,
    the larger one-sided p), "equivalent" (p < 0.05); the same for k_claimed prefixed
    "claimed_" ("base_kl_at_k_claimed", "claimed_p_value", ...). A test that cannot run
    (no K', fewer than 2 prompts) has None in its fields.
    """
    a = _as_1d(a_per_prompt, "a_per_prompt")
    out = {**plan, "margin": float(margin), "n": int(a.size)}
    for prefix, k_run in (("", plan["k_base"]), ("claimed_", plan["k_claimed"])):
        kl_key = "base_kl_at_k_base" if not prefix else "base_kl_at_k_claimed"
        fields = {kl_key: None, **{f"{prefix}{f}": None for f in ("mean_diff", "p_lower", "p_upper", "p_value",
                                                                     "equivalent")}}
        if k_run is not None:
            base = _as_1d(base_per_prompt_by_k[k_run], "base_per_prompt")
            fields[kl_key] = float(base.mean())
            if a.size >= 2:
                test = paired_tost(a, base, margin)
                fields.update({f"{prefix}{f}": test[f] for f in ("mean_diff", "p_lower", "p_upper", "p_value",
                                                                 "equivalent")})
        out.update(fields)
    return out
