"""Uncertainty for every figure the project reports: cluster bootstrap intervals, paired tests over
clusters, Holm's correction, the share of a gap closed, the minimum detectable difference of the
test actually used, and a median's distribution-free interval (for timings).

Evaluation rows are not independent: a test seed contributes one isomer per domain, and those rows
share their logic and hence their difficulty. Every interval here therefore resamples *clusters*
(test seeds), never rows. With several training seeds, `clusters` is a pair `(train_seeds,
test_seeds)` and the bootstrap has two levels: training seeds and test seeds are drawn independently,
each test-seed draw shared by every training seed, because the design is crossed (every trained
model is scored on the same problems) and not nested. Intervals are percentile intervals, as
`scipy.stats.bootstrap(method="percentile")` gives; a bootstrap p-value is the matching Monte-Carlo
tail fraction, so "p < α" and "the 1 − α interval excludes 0" agree. With one trained model per
method the paired p-value comes from a sign-flip test over clusters instead (`paired_permutation_p`):
exact at any number of clusters, where a percentile bootstrap with a few dozen clusters rejects a
true null somewhat more often than α.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

import numpy as np

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


def gap_closed(method: Sequence | np.ndarray, baseline: Sequence | np.ndarray, reference: Sequence | np.ndarray,
               clusters: Clusters, n_boot: int = 2000, level: float = 0.95, seed: int = 0
               ) -> tuple[float, float, float]:
    """(fraction, lo, hi): the share of the baseline-to-reference gap that `method` closes,
    (mean(method) − mean(baseline)) / (mean(reference) − mean(baseline)): 0 is the baseline (ERM), 1 the
    reference (the no-hint oracle, what the invariant signal alone gives; IRM's grayscale model).

    The three are measured on the same observations in the same order, resampled with one draw of
    clusters. As Fieller's interval for a ratio, the interval is unbounded (−inf, inf) when the gap's own
    interval contains 0: a gap that may not exist has no fraction to close. Raises ValueError when the
    observed gap is 0.
    """
    arrays = [np.asarray(x, dtype=float) for x in (method, baseline, reference)]
    if len({x.shape for x in arrays}) > 1:
        raise ValueError(f"method, baseline and reference need one shape, got {[x.shape for x in arrays]}")
    m, b, r = arrays
    gap = r.mean() - b.mean()
    if gap == 0:
        raise ValueError("the baseline and the reference agree: there is no gap to close")
    def gap_and_fraction(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
        g = z.mean() - y.mean()
        return g, (x.mean() - y.mean()) / g

    with np.errstate(divide="ignore", invalid="ignore"):  # a draw whose gap vanishes: ±inf, or nan (0/0), left out
        gaps, fractions = _replicates(arrays, clusters, gap_and_fraction, n_boot, seed).T
    glo, ghi = _percentiles(gaps, level)
    if glo <= 0 <= ghi:
        return float((m.mean() - b.mean()) / gap), -np.inf, np.inf
    lo, hi = _percentiles(fractions[~np.isnan(fractions)], level)
    return float((m.mean() - b.mean()) / gap), lo, hi


def paired_permutation_p(a: Sequence | np.ndarray, b: Sequence | np.ndarray, clusters: Sequence | np.ndarray,
                         stat: Stat = np.mean, alternative: Alternative = "two-sided", n_perm: int = 4000,
                         seed: int = 0) -> float:
    """The p-value of stat(a) − stat(b) against "no difference", from swapping the two methods' values
    cluster by cluster (a sign-flip test over test seeds). Under the null the two values of a problem
    are exchangeable and one swap covers a whole test seed, so the test holds whatever the rows of a
    seed share; swapping rows one by one (McNemar's test) would not. Every swap is enumerated up to
    12 clusters, `n_perm` random ones beyond; p = (1 + #as extreme) / (1 + #swaps) is never 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have one shape, got {a.shape} and {b.shape}")
    labels = _labels(clusters, a.shape[0])
    m = labels.max() + 1
    if m <= 12:  # every swap but the identity, which the +1 of _permutation_p counts: the exact p
        flips = ((np.arange(1, 2 ** m)[:, None] >> np.arange(m)) & 1).astype(bool)
    else:
        flips = np.random.default_rng(seed).integers(0, 2, (n_perm, m)).astype(bool)
    observed = stat(a) - stat(b)
    swapped = np.array([stat(np.where(f[labels], b, a)) - stat(np.where(f[labels], a, b)) for f in flips])
    return float(_permutation_p(np.float64(observed), swapped, alternative))


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


def detectable_difference(diffs: np.ndarray, step: np.ndarray | None = None, alpha: float = 0.05,
                          power: float = 0.8, alternative: Alternative = "two-sided", n_sim: int = 200,
                          n_draws: int = 500, seed: int = 0) -> float:
    """The smallest true mean difference that the test `compare` uses detects with probability `power`
    at level `alpha`, found by simulating that test (iga.eval.scores.compare).

    `diffs[k, s]` is the two methods' mean difference on test seed s under training seed k. Each
    simulated experiment redraws training seeds and test seeds from the observed, centred differences
    and adds the true difference δ; the test is the sign-flip over test seeds with one training seed,
    the two-level bootstrap with several. A continuous figure (NLL, gaps) shifts by δ on every seed.
    An accuracy moves in whole problems: `step[s]` is one problem's share of test seed s's mean
    (1 / its rows), and a seed gains ⌊δ/step⌋ problems and one more with the remainder's probability,
    δ on average. (Shifting every seed by a fraction of a problem would call two near-identical methods
    able to detect almost any difference, since their differences barely vary.) Every δ sees the same
    draws, so power rises with δ and a bisection finds the smallest δ that reaches `power`. Raises
    ValueError when no difference can reach it (too few test seeds for a test at `alpha`).
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.shape[1] < 2:
        raise ValueError(f"a detectable difference needs at least 2 test seeds, got shape {d.shape}")
    k, s = d.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, k, (n_sim, k)) if k > 1 else np.zeros((n_sim, 1), dtype=int)
    cols = rng.integers(0, s, (n_sim, s))
    # each simulated experiment's differences (training seed x test seed) under no true difference
    null = np.stack([(d - d.mean())[r][:, c] for r, c in zip(rows, cols)])  # (n_sim, k, s)
    if step is None:
        def shifted(delta: float) -> np.ndarray:
            return null + delta
    else:
        step = np.asarray(step, dtype=float)
        if step.shape != (s,) or np.any(step <= 0):
            raise ValueError(f"step needs one positive value per test seed ({s}), got {step!r}")
        unit = step[cols][:, None, :]  # the step of each drawn seed
        u = rng.random(null.shape)

        def shifted(delta: float) -> np.ndarray:
            whole = np.floor(delta / unit)
            return null + unit * (whole + (u < delta / unit - whole))
    if k == 1:
        signs = 1.0 - 2.0 * rng.integers(0, 2, (n_draws, s))

        def p_values(delta: float) -> np.ndarray:
            x = shifted(delta)[:, 0]
            return _permutation_p(x.mean(1), x @ signs.T / s, alternative)
    else:
        outer = np.stack([np.bincount(i, minlength=k) for i in rng.integers(0, k, (n_draws, k))]) / k
        inner = np.stack([np.bincount(i, minlength=s) for i in rng.integers(0, s, (n_draws, s))]) / s

        def p_values(delta: float) -> np.ndarray:  # each draw's weights sum to 1
            return _bootstrap_p(np.einsum("bk,nkb->nb", outer, shifted(delta) @ inner.T), alternative)

    def reached(delta: float) -> bool:
        return float(np.mean(p_values(delta) < alpha)) >= power

    hi = 4 * d.std() + (0.0 if step is None else float(np.min(step))) + 1e-12
    for _ in range(8):
        if reached(hi):
            break
        hi *= 4
    else:
        raise ValueError(f"no difference is detectable at α = {alpha} with {s} test seeds and {k} training seeds")
    lo = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reached(mid) else (mid, hi)
        if hi - lo <= 1e-3 * hi:
            break
    return float(hi)


# --- resampling ------------------------------------------------------------------------------------

def median_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(median, lo, hi, confidence): the sample median and the distribution-free interval between two order
    statistics, x_(k) and x_(n+1-k), that covers the true median with probability `confidence` (the number of
    values below the median is Binomial(n, 1/2)): the narrowest such interval with confidence >= `level`. With
    too few values for `level` (n < 6 at 95 %) it is min-max with its lower confidence, said rather than
    stretched. For timings, whose noise is one-sided (a stall slows a step, nothing speeds one up), where a
    mean and its t interval would not do."""
    x = np.sort(np.asarray(values, dtype=float))
    n = x.size
    if n == 0:
        raise ValueError("median_interval: no values")
    confidence = lambda k: 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n  # noqa: E731
    k = 1
    while k < (n + 1) // 2 and confidence(k + 1) >= level:
        k += 1
    return float(np.median(x)), float(x[k - 1]), float(x[n - k]), confidence(k)


def _replicates(arrays: list[np.ndarray], clusters: Clusters, stat: Callable[..., Any], n_boot: int,
                seed: int) -> np.ndarray:
    """`stat` on `n_boot` cluster-resampled copies of `arrays` (one draw of rows shared by all): (n_boot,)
    for a scalar statistic, (n_boot, k) for k of them."""
    members = _members(clusters, len(arrays[0]))
    rng = np.random.default_rng(seed)
    return np.array([stat(*(x[idx] for x in arrays)) for idx in (members(rng) for _ in range(n_boot))], dtype=float)


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


def _bootstrap_p(reps: np.ndarray, alternative: Alternative) -> np.ndarray | float:
    """Monte-Carlo tail fraction at 0 along the last axis, with the usual +1 so that no p-value is
    exactly 0."""
    n = reps.shape[-1]
    below = (np.sum(reps <= 0, axis=-1) + 1) / (n + 1)
    above = (np.sum(reps >= 0, axis=-1) + 1) / (n + 1)
    p = {"greater": below, "less": above}.get(alternative, np.minimum(1.0, 2 * np.minimum(below, above)))
    return float(p) if np.ndim(p) == 0 else p


def _permutation_p(observed: np.ndarray, swapped: np.ndarray, alternative: Alternative) -> np.ndarray:
    """p of each `observed` statistic (shape (...)) among its label-swapped ones (shape (..., n)),
    the observed labelling counted as one of them. A swap whose sum differs from the observed one only in
    its last bits (another summation order) counts as equal."""
    observed = observed[..., None]
    tol = 1e-9 * np.maximum(1.0, np.abs(observed))
    hits = {"greater": swapped >= observed - tol, "less": swapped <= observed + tol}.get(
        alternative, np.abs(swapped) >= np.abs(observed) - tol)
    return (hits.sum(-1) + 1) / (swapped.shape[-1] + 1)
