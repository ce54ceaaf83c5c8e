"""A multi-resolution hierarchy of an attribution graph by repeated spectral clustering (DESIGN 8.3 step 2).

Level 0 holds one cluster per graph node. Level l+1 partitions the clusters of level l: their
graph is the coarsened one, W_{l+1} = P^T W_l P for the membership matrix P [n_l, n_{l+1}], and
it is split by spectral clustering (Ng, Jordan & Weiss): the k eigenvectors of the normalised
Laplacian I - D^-1/2 W D^-1/2 with the smallest eigenvalues (scipy's symmetric eigensolver),
rows normalised to unit length, then k-means (scipy's kmeans2 from k-means++ starts, the best
of several; the starts are drawn here with numpy, since scipy's own "++" start took 30x longer
than the k-means itself at k = 130). k = ceil(n_l / ratio), so each level is `ratio` times coarser, until at most `top`
clusters remain.

W is the symmetrised |adjacency| (`FeatureGraph.symmetric_weights`). An isolated node would
leave D singular, so every node gets a self-loop of `self_loop` times the mean degree: D is
then invertible, an isolated node is a component of its own, and disconnected components keep
their own zero eigenvalues, so k-means sees them apart. (A uniform teleport between all pairs,
tried first, made isolating a node cost a normalised cut of 1 and split dense blocks instead.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.linalg import eigh

from backend.errors import InvalidParameterError


@dataclass
class Cluster:
    """One cluster of the tree.

    id: "L{level}C{index}"; level: 0 for single graph nodes; index: its position in its level;
    members: the graph-node indices it contains (sorted); children: indices of its clusters at
    level - 1 (empty at level 0); parent: its index at level + 1 (None at the top).
    """

    id: str
    level: int
    index: int
    members: list[int]
    children: list[int] = field(default_factory=list)
    parent: int | None = None

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class Hierarchy:
    """levels[l] is the list of clusters of level l; levels[0] has one cluster per graph node."""

    levels: list[list[Cluster]]
    n_nodes: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def top(self) -> list[Cluster]:
        return self.levels[-1]

    def cluster(self, level: int, index: int) -> Cluster:
        return self.levels[level][index]

    def labels(self, level: int) -> np.ndarray:
        """[n_nodes] the index of each graph node's cluster at `level`."""
        out = np.full(self.n_nodes, -1, dtype=int)
        for c in self.levels[level]:
            out[c.members] = c.index
        return out

    def counts(self) -> list[int]:
        """Clusters per level, finest first."""
        return [len(level) for level in self.levels]

    def check(self) -> None:
        """Raise AssertionError unless the tree is consistent: every level partitions the nodes,
        each cluster's members are the union of its children's, parents and children agree."""
        for l, level in enumerate(self.levels):
            assert [c.index for c in level] == list(range(len(level))), f"level {l}: indices"
            members = sorted(m for c in level for m in c.members)
            assert members == list(range(self.n_nodes)), f"level {l} does not partition the nodes"
            for c in level:
                assert c.level == l and c.members == sorted(c.members) and c.members
                if l == 0:
                    assert not c.children and len(c.members) == 1
                else:
                    union = sorted(m for ch in c.children for m in self.levels[l - 1][ch].members)
                    assert union == c.members, f"{c.id}: members are not its children's union"
                    assert all(self.levels[l - 1][ch].parent == c.index for ch in c.children)
                assert (c.parent is None) == (l == len(self.levels) - 1)

    def to_json(self) -> dict[str, Any]:
        return {"n_nodes": self.n_nodes, "params": self.params, "counts": self.counts(),
                "levels": [[{"id": c.id, "level": c.level, "index": c.index, "members": c.members,
                             "children": c.children, "parent": c.parent} for c in level] for level in self.levels]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hierarchy:
        levels = [[Cluster(**c) for c in level] for level in data["levels"]]
        return cls(levels=levels, n_nodes=int(data["n_nodes"]), params=dict(data.get("params", {})))


def spectral_partition(weights: np.ndarray, k: int, seed: int = 0, restarts: int = 10,
                       self_loop: float = 1e-3) -> np.ndarray:
    """Labels [n] in 0..k'-1 (k' <= k: empty k-means clusters are dropped) of a weighted graph.

    weights: [n, n] symmetric, non-negative. The k smallest eigenvectors of the normalised
    Laplacian, rows normalised, k-means with `restarts` seeded k-means++ starts (best inertia).
    """
    n = weights.shape[0]
    if k <= 1 or n <= 1:
        return np.zeros(n, dtype=int)
    if k >= n:
        return np.arange(n)
    w = np.asarray(weights, dtype=np.float64)
    degree = w.sum(1)
    mean_degree = degree.mean() if degree.mean() > 0 else 1.0
    w = w.copy()
    np.fill_diagonal(w, self_loop * mean_degree)  # see the module docstring
    inv_sqrt = 1.0 / np.sqrt(w.sum(1))
    laplacian = np.eye(n) - inv_sqrt[:, None] * w * inv_sqrt[None, :]
    _, vectors = eigh(laplacian, subset_by_index=[0, k - 1])          # [n, k], smallest eigenvalues
    rows = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    best, best_inertia = None, math.inf
    rng = np.random.default_rng(seed)
    for _ in range(restarts):
        with warnings.catch_warnings():  # an empty cluster is dropped below; no need to warn
            warnings.simplefilter("ignore", UserWarning)
            centroids, labels = kmeans2(rows, kmeans_pp(rows, k, rng), minit="matrix")
        inertia = float(((rows - centroids[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    _, compact = np.unique(best, return_inverse=True)  # drop empty clusters, keep 0..k'-1
    return compact.astype(int)


def kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ starting centroids [k, dim]: each next one drawn with probability ~ D(x)^2."""
    n = len(points)
    chosen = [int(rng.integers(n))]
    d2 = ((points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        total = d2.sum()
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        chosen.append(i)
        d2 = np.minimum(d2, ((points - points[i]) ** 2).sum(1))
    return points[chosen].copy()


def coarsen(weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """P^T W P: the total weight between clusters ([k, k], zero diagonal)."""
    k = int(labels.max()) + 1
    member = np.zeros((len(labels), k))
    member[np.arange(len(labels)), labels] = 1.0
    out = member.T @ weights @ member
    np.fill_diagonal(out, 0.0)
    return out


def build_hierarchy(weights: np.ndarray, ratio: float = 4.0, top: int = 5, seed: int = 0,
                    max_levels: int = 12) -> Hierarchy:
    """Repeated spectral clustering of `weights` [n, n] until at most `top` clusters remain."""
    if ratio <= 1:
        raise InvalidParameterError(f"the coarsening ratio must exceed 1, not {ratio}")
    if top < 1:
        raise InvalidParameterError(f"the top level needs at least one cluster, not {top}")
    n = weights.shape[0]
    if n == 0:
        raise InvalidParameterError("cannot build a hierarchy of an empty graph")
    levels = [[Cluster(f"L0C{i}", 0, i, [i]) for i in range(n)]]
    w = np.asarray(weights, dtype=np.float64)
    while len(levels[-1]) > top and len(levels) <= max_levels:
        below = levels[-1]
        k = max(top, math.ceil(len(below) / ratio))
        labels = spectral_partition(w, k, seed=seed + len(levels))
        if labels.max() + 1 >= len(below):  # nothing merged (k-means kept every point apart)
            labels = spectral_partition(w, max(1, len(below) // 2), seed=seed + len(levels))
        l = len(levels)
        level = []
        for j in range(int(labels.max()) + 1):
            children = np.nonzero(labels == j)[0].tolist()
            members = sorted(m for ch in children for m in below[ch].members)
            level.append(Cluster(f"L{l}C{j}", l, j, members, children))
            for ch in children:
                below[ch].parent = j
        levels.append(level)
        w = coarsen(w, labels)
    return Hierarchy(levels, n, {"ratio": ratio, "top": top, "seed": seed})
