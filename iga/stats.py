"""Uncertainty for every figure the project reports: cluster bootstrap intervals, paired tests, Holm's
correction and the minimum detectable effect.

Evaluation rows are not independent: a test seed contributes one isomer per domain, and those rows
share their logic and hence their difficulty. Every interval here therefore resamples *clusters*
(test seeds), never rows. With several training seeds, `clusters` is a pair `(train_seeds,
test_seeds)` and the bootstrap has two levels: training seeds and test seeds are drawn independently,
each test-seed draw shared by every training seed, because the design is crossed (every trained
model is scored on the same problems) and not nested. Intervals are percentile intervals, as
`scipy.stats.bootstrap(method="percentile")` gives; p-values are the matching Monte-Carlo tail
fractions, so "p < α" and "the 1 − α interval excludes 0" agree.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
from scipy import stats as _scipy

Alternative = Literal["two-sided", "greater", "less"]
Clusters = Sequence | np.ndarray | tuple[Sequence, Sequence]
Stat = Callable[[np.ndarray], float]


def cluster_bootstrap_ci(values: Sequence | np.ndarray, clusters: Clusters, stat: Stat = np.mean,
                         n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi): `stat(values)` and its percentile interval from resampling whole clusters.

    `values` has one entry (or one row) per observation; `clusters` names each observation's cluster,
    or is a pair (outer, inner) of such arrays for the two-level bootstrap of the module docstring.
    """
    values = np.asarray(values, dtype=float)
    reps = _replicates([values], clusters, lambda v: stat(v), n_boot, seed)
    lo, hi = _percentiles(reps, level)
    return float(stat(values)), lo, hi


def paired_bootstrap_diff(a: Sequence | np.ndarray, b: Sequence | np.ndarray, clusters: Clusters, n_boot: int = 2000,
                          level: float = 0.95, seed: int = 0, stat: Stat = np.mean,
                          alternative: Alternative = "two-sided") -> tuple[float, float, float, float]:
    """(delta, lo, hi, p) for delta = stat(a) − stat(b) (with the default mean: mean(a − b)).

    `a` and `b` are two methods' values on the same observations in the same order; both are
    resampled with one draw of clusters, so their shared difficulty cancels. p is the bootstrap
    p-value of `alternative` against delta = 0 ("greater": a above b).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have one shape, got {a.shape} and {b.shape}")
    reps = _replicates([a, b], clusters, lambda x, y: stat(x) - stat(y), n_boot, seed)
    lo, hi = _percentiles(reps, level)
    return float(stat(a) - stat(b)), lo, hi, _bootstrap_p(reps, alternative)


def unpaired_bootstrap_diff(a: Sequence | np.ndarray, clusters_a: Clusters, b: Sequence | np.ndarray,
                            clusters_b: Clusters, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                            stat: Stat = np.mean, alternative: Alternative = "two-sided"
                            ) -> tuple[float, float, float, float]:
    """(delta, lo, hi, p) for delta = stat(a) − stat(b) when a and b were measured on different
    observations (nothing to pair): each side's clusters are resampled independently."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    reps = (_replicates([a], clusters_a, lambda x: stat(x), n_boot, seed)
            - _replicates([b], clusters_b, lambda x: stat(x), n_boot, seed + 1))
    lo, hi = _percentiles(reps, level)
    return float(stat(a) - stat(b)), lo, hi, _bootstrap_p(reps, alternative)


def mcnemar_exact(a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray,
                  alternative: Alternative = "two-sided") -> float:
    """The exact McNemar test: a binomial test on the discordant pairs (a right and b wrong, or the
    reverse), each equally likely under the null. "greater": a is right more often than b."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have one shape, got {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(_scipy.binomtest(only_a, only_a + only_b, 0.5, alternative=alternative).pvalue)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order: reject
    hypothesis i at level α exactly when its adjusted p-value is ≤ α."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8,
                          alternative: Alternative = "two-sided") -> float:
    """The smallest true mean difference a level-`alpha` test detects with probability `power`,
    given `n` independent units (test seeds) whose paired differences have standard deviation `sd`:
    (t_{1−α/2} + t_{power}) · sd / √n with n − 1 degrees of freedom (the usual approximation).

    For accuracy, sd is that of the per-seed difference in accuracy between two methods; for NLL,
    of the per-seed difference in mean NLL. Both come from a paired evaluation on the same problems.
    """
    if n < 2:
        raise ValueError(f"a minimum detectable effect needs at least 2 units, got {n}")
    tail = alpha / 2 if alternative == "two-sided" else alpha
    t = _scipy.t(df=n - 1)
    return float((t.ppf(1 - tail) + t.ppf(power)) * sd / np.sqrt(n))


# --- resampling ------------------------------------------------------------------------------------

def _replicates(arrays: list[np.ndarray], clusters: Clusters, stat: Callable[..., float], n_boot: int,
                seed: int) -> np.ndarray:
    """`stat` on `n_boot` cluster-resampled copies of `arrays` (one draw of rows shared by all)."""
    n = len(arrays[0])
    members = _members(clusters, n)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for k in range(n_boot):
        idx = members(rng)
        out[k] = stat(*(x[idx] for x in arrays))
    return out


def _members(clusters: Clusters, n: int) -> Callable[[np.random.Generator], np.ndarray]:
    """A function drawing one bootstrap sample of row indices: clusters with replacement, each drawn
    cluster contributing all its rows; for a pair (outer, inner), the crossed two-level draw (every
    drawn outer unit with every drawn inner unit). Vectorised: a draw is a few numpy operations."""
    two_level = isinstance(clusters, tuple)
    outer, inner = (_labels(c, n) for c in clusters) if two_level else (np.zeros(n, dtype=int), _labels(clusters, n))
    n_outer, n_inner = outer.max() + 1, inner.max() + 1
    cell = outer * n_inner + inner
    order = np.argsort(cell, kind="stable")  # rows grouped by cell
    sizes = np.bincount(cell, minlength=n_outer * n_inner)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def draw(rng: np.random.Generator) -> np.ndarray:
        os = rng.integers(0, n_outer, n_outer) if two_level else np.zeros(1, dtype=int)
        chosen = (os[:, None] * n_inner + rng.integers(0, n_inner, n_inner)[None, :]).ravel()
        lengths = sizes[chosen]
        # the concatenation of the chosen cells' row ranges, without a Python loop
        shift = np.repeat(starts[chosen] - np.cumsum(lengths) + lengths, lengths)
        return order[np.arange(lengths.sum()) + shift]
    return draw


def _labels(clusters: Sequence | np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(clusters)
    if labels.shape != (n,):
        raise ValueError(f"clusters must name one cluster per observation ({n}), got shape {labels.shape}")
    if n == 0:
        raise ValueError("no observations to bootstrap")
    return np.unique(labels, return_inverse=True)[1]


def _percentiles(reps: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _bootstrap_p(reps: np.ndarray, alternative: Alternative) -> float:
    """Monte-Carlo tail fraction at 0, with the usual +1 so that no p-value is exactly 0."""
    below = (np.sum(reps <= 0) + 1) / (reps.size + 1)
    above = (np.sum(reps >= 0) + 1) / (reps.size + 1)
    if alternative == "greater":
        return float(below)
    if alternative == "less":
        return float(above)
    return float(min(1.0, 2 * min(below, above)))
