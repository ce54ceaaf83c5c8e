"""FADE metrics of a feature and its explanation (Puri et al. 2025; DESIGN section 7).

A rater labels texts 0 (concept absent), 1 (vague) or 2 (clearly present). The activation of a
text is the *signed* activation at its token of largest |activation| (`text_activation`).

- Clarity: activations of texts generated to express the concept (positives) against natural
  texts (negatives); Gini = |2*AUC - 1|.
- Responsiveness: natural texts sampled across activation quantiles, rated; texts rated 2
  (positives) against texts rated 0 (negatives), texts rated 1 dropped; Gini = |2*AUC - 1|.
- Purity: average precision of the activation ranking against the labels "rated 2".
- Faithfulness: the feature is steered with several factors (multiples of its max activation);
  the mean rating of the continuations, normalised to [0, 1], is compared with the unsteered
  baseline: max(best - baseline, 0) / (1 - baseline).

AUC and average precision are implemented here (vectorised numpy) with ties handled exactly as
scikit-learn's `roc_auc_score` and `average_precision_score`. A metric whose labels hold only one
class is undefined: the functions return None (the caller records why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

METRICS: tuple[str, ...] = ("clarity", "responsiveness", "purity", "faithfulness")


def _binary(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of `scores` [n], tied values sharing the mean of their ranks: [n]."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)                      # the highest rank of each tie group
    return (upper - (counts - 1) / 2.0)[inverse]


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float | None:
    """Area under the ROC curve of `scores` [n] for binary labels `y_true` [n].

    The Mann-Whitney form with average ranks for ties, which equals scikit-learn's trapezoidal
    `roc_auc_score`. None when only one class is present.
    """
    y, s = _binary(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y_true: ArrayLike, scores: ArrayLike) -> float | None:
    """Average precision of the ranking by `scores` [n] against binary labels `y_true` [n].

    AP = sum over distinct thresholds (high to low) of (R_i - R_{i-1}) * P_i, every tie group
    entering at once, as scikit-learn's `average_precision_score`. None without positives.
    """
    y, s = _binary(y_true, scores)
    if not y.any():
        return None
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last_of_group].astype(np.float64)
    precision = tps / (last_of_group + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def gini(auc: float | None) -> float | None:
    """|2 * AUC - 1|: 0 for a useless ranking, 1 for a perfect one (in either direction)."""
    return None if auc is None else abs(2.0 * auc - 1.0)


def text_activation(acts: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Per text, the signed activation at its token of largest |activation|.

    acts: [n, T] activations of one feature per token; mask: [n, T] (1 = a real token; padding
    and the BOS position 0 are usually masked out). Returns [n]; 0 for a text without tokens.
    """
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if mask is not None:
        a = np.where(np.asarray(mask, dtype=bool), a, 0.0)
    if a.shape[1] == 0:
        return np.zeros(a.shape[0])
    idx = np.abs(a).argmax(axis=1)
    return a[np.arange(a.shape[0]), idx]


def clarity(concept_acts: ArrayLike, natural_acts: ArrayLike) -> float | None:
    """Gini of the AUC separating texts that express the concept [n_c] from natural texts [n_n]."""
    c = np.asarray(concept_acts, dtype=np.float64).ravel()
    n = np.asarray(natural_acts, dtype=np.float64).ravel()
    labels = np.r_[np.ones(c.size, dtype=bool), np.zeros(n.size, dtype=bool)]
    return gini(roc_auc(labels, np.r_[c, n]))


def responsiveness(acts: ArrayLike, ratings: ArrayLike) -> float | None:
    """Gini of the AUC separating natural texts rated 2 from those rated 0 (rated 1: dropped).

    acts, ratings: [n] (text activations and 0/1/2 ratings of the same texts).
    """
    a = np.asarray(acts, dtype=np.float64).ravel()
    r = np.asarray(ratings).ravel()
    keep = r != 1
    return gini(roc_auc(r[keep] == 2, a[keep]))


def purity(acts: ArrayLike, ratings: ArrayLike) -> float | None:
    """Average precision of the activation ranking [n] against the labels "rated 2" [n]."""
    return average_precision(np.asarray(ratings).ravel() == 2, acts)


def faithfulness(ratings_by_factor: Mapping[float, Sequence[int]], baseline: float = 0.0) -> float | None:
    """max(best - base, 0) / (1 - base) over steering factors.

    ratings_by_factor: steering factor -> 0/1/2 ratings of its continuations; each factor's
    score is its mean rating / 2 (in [0, 1]); base is the score of factor `baseline` (no
    steering), best the highest score of the other factors. 0 when base is already 1.
    """
    scores = {f: float(np.mean(r)) / 2.0 for f, r in ratings_by_factor.items() if len(r)}
    if baseline not in scores or len(scores) < 2:
        return None
    base = scores[baseline]
    best = max(v for f, v in scores.items() if f != baseline)
    if base >= 1.0:
        return 0.0
    return max(best - base, 0.0) / (1.0 - base)
