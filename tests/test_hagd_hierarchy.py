"""HAGD's hierarchy: spectral coarsening recovers planted communities; the tree is consistent."""

from __future__ import annotations

import numpy as np
import pytest

from backend.errors import InvalidParameterError
from backend.hagd.hierarchy import Hierarchy, build_hierarchy, coarsen, spectral_partition


def planted(sizes: list[int], p_in: float, p_out: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weighted stochastic block model: (weights [n, n] symmetric, true labels [n])."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    same = labels[:, None] == labels[None, :]
    edge = rng.random((len(labels),) * 2) < np.where(same, p_in, p_out)
    w = np.triu(edge * rng.uniform(0.5, 1.5, edge.shape), 1)
    return w + w.T, labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two labelings group the nodes identically (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_spectral_partition_recovers_planted_communities():
    w, truth = planted([12, 15, 10, 13], p_in=0.6, p_out=0.02, seed=1)
    assert same_partition(spectral_partition(w, 4, seed=0), truth)


def test_disconnected_components_and_isolated_nodes_are_fine():
    w, truth = planted([8, 8], p_in=0.9, p_out=0.0, seed=2)
    w = np.pad(w, ((0, 1), (0, 1)))  # an isolated node
    labels = spectral_partition(w, 3, seed=0)
    assert same_partition(labels[:16], truth) and len(set(labels.tolist())) == 3


def test_hierarchy_levels_nest_and_recover_two_scales():
    # 16 small communities of 6, grouped into 4 super-communities of 4.
    rng = np.random.default_rng(3)
    small = np.repeat(np.arange(16), 6)
    big = small // 4
    p = np.where(small[:, None] == small[None, :], 0.9, np.where(big[:, None] == big[None, :], 0.12, 0.003))
    edge = rng.random(p.shape) < p
    w = np.triu(edge * 1.0, 1)
    w = w + w.T
    h = build_hierarchy(w, ratio=6, top=4, seed=0)
    h.check()
    assert h.counts() == [96, 16, 4]
    assert same_partition(h.labels(1), small) and same_partition(h.labels(2), big)
    for l in range(1, len(h.levels)):  # every level partitions the level below
        below, here = h.labels(l - 1), h.labels(l)
        assert all(len(set(here[below == c].tolist())) == 1 for c in set(below.tolist()))
    assert all(c.parent is None for c in h.top)
    assert Hierarchy.from_json(h.to_json()).to_json() == h.to_json()


def test_coarsen_keeps_the_weight_between_clusters():
    w, truth = planted([5, 5, 5], 0.8, 0.2, seed=4)
    c = coarsen(w, truth)
    assert c.shape == (3, 3) and np.allclose(c, c.T) and np.all(np.diag(c) == 0)
    assert np.isclose(c.sum(), w.sum() - sum(w[np.ix_(truth == k, truth == k)].sum() for k in range(3)))


def test_small_graphs_and_bad_parameters():
    h = build_hierarchy(np.zeros((3, 3)), top=5)
    h.check()
    assert h.counts() == [3]
    with pytest.raises(InvalidParameterError):
        build_hierarchy(np.zeros((3, 3)), ratio=1)
    with pytest.raises(InvalidParameterError):
        build_hierarchy(np.zeros((0, 0)))
