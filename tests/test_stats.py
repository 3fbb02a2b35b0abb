"""iga.stats against independent computations: scipy, hand-worked cases, and coverage and power
simulations."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from scipy.optimize import brentq

from iga.stats import (
    cluster_bootstrap_ci,
    detectable_difference,
    gap_closed,
    holm,
    median_interval,
    paired_bootstrap_diff,
    paired_permutation_p,
)


def test_singleton_clusters_match_scipys_percentile_bootstrap():
    x = np.random.default_rng(1).exponential(size=60)
    est, lo, hi = cluster_bootstrap_ci(x, np.arange(60), n_boot=20_000)
    ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=20_000, method="percentile", random_state=2)
    assert est == pytest.approx(x.mean())
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.03 * width)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.03 * width)


def test_equal_clusters_of_copies_are_their_means_bootstrapped():
    """A cluster of k identical rows carries one observation's information, not k."""
    means = np.random.default_rng(3).normal(size=25)
    rows, labels = np.repeat(means, 6), np.repeat([f"s{i:02d}" for i in range(25)], 6)
    assert cluster_bootstrap_ci(rows, labels) == pytest.approx(cluster_bootstrap_ci(means, np.arange(25)))


def _coverage(n_sims: int, make, clusters, true_mean: float) -> float:
    hits = 0
    for s in range(n_sims):
        values = make(np.random.default_rng(100 + s))
        _, lo, hi = cluster_bootstrap_ci(values, clusters, n_boot=300, seed=s)
        hits += lo <= true_mean <= hi
    return hits / n_sims


def test_cluster_bootstrap_covers_and_a_row_bootstrap_does_not():
    """Rows within a test seed share its difficulty (intra-cluster correlation 0.8): resampling seeds
    keeps 95 % coverage, resampling rows pretends to 6x the information and under-covers."""
    n_seeds, per = 30, 6
    seeds = np.repeat(np.arange(n_seeds), per)

    def make(rng):
        return np.repeat(rng.normal(0, 2, n_seeds), per) + rng.normal(0, 1, n_seeds * per)

    assert 0.88 <= _coverage(150, make, seeds, 0.0) <= 0.99
    assert _coverage(150, make, np.arange(n_seeds * per), 0.0) < 0.8


def test_two_level_bootstrap_covers_a_crossed_design():
    """Training seeds × test seeds, each with its own random effect: the two-level bootstrap covers,
    a bootstrap over test seeds alone misses the spread between trained models."""
    n_train, n_test = 12, 30
    train, test = np.repeat(np.arange(n_train), n_test), np.tile(np.arange(n_test), n_train)

    def make(rng):
        return rng.normal(0, 1, n_train)[train] + rng.normal(0, 1, n_test)[test] + rng.normal(0, 0.5, train.size)

    assert 0.85 <= _coverage(150, make, (train, test), 0.0) <= 0.99
    assert _coverage(150, make, test, 0.0) < 0.8


def test_paired_difference_cancels_shared_difficulty():
    rng = np.random.default_rng(5)
    seeds = np.repeat(np.arange(40), 3)
    difficulty = np.repeat(rng.normal(0, 10, 40), 3)  # huge, and shared by both methods
    b = difficulty + rng.normal(0, 0.1, seeds.size)
    delta, lo, hi, p = paired_bootstrap_diff(b + 0.5, b, seeds)
    assert (delta, lo, hi) == pytest.approx((0.5, 0.5, 0.5)) and p == pytest.approx(2 / 2001)
    assert paired_bootstrap_diff(b, b, seeds)[3] == 1.0
    noisy = b + rng.normal(0.5, 1.0, seeds.size)
    d, lo, hi, p = paired_bootstrap_diff(noisy, b, seeds)
    assert d == pytest.approx(np.mean(noisy - b)) and lo < d < hi and p < 0.05
    assert paired_bootstrap_diff(noisy, b, seeds, alternative="greater")[3] < paired_bootstrap_diff(
        noisy, b, seeds, alternative="less")[3]
    assert (lo, hi) == pytest.approx(paired_bootstrap_diff(noisy + difficulty, b + difficulty, seeds)[1:3])


def test_paired_difference_of_a_custom_statistic():
    """|gap| ranks Δ-Gaps: a gap of −0.2 is no better than one of +0.2."""
    seeds = np.arange(50)
    rng = np.random.default_rng(6)
    a, b = rng.normal(-0.2, 0.05, 50), rng.normal(0.2, 0.05, 50)
    delta, lo, hi, p = paired_bootstrap_diff(a, b, seeds, stat=lambda v: abs(np.mean(v)))
    assert delta == pytest.approx(abs(a.mean()) - abs(b.mean())) and lo < 0 < hi and p > 0.05


def test_sign_flip_by_hand():
    """Three test seeds whose differences are 1, 2 and 3 (the third seed has two rows): of the 8 ways to
    swap the methods seed by seed, only the observed one is as large (one-sided p = 1/8); two-sided,
    it and its mirror (2/8)."""
    a, b, seeds = [1.0, 2.0, 1.5, 1.5], [0.0, 0.0, 0.0, 0.0], [0, 1, 2, 2]
    assert paired_permutation_p(a, b, seeds, alternative="greater") == pytest.approx(1 / 8)
    assert paired_permutation_p(a, b, seeds) == pytest.approx(2 / 8)
    assert paired_permutation_p(a, b, seeds, alternative="less") == pytest.approx(1.0)
    assert paired_permutation_p([1.0, 0.0], [1.0, 0.0], [0, 1]) == 1.0  # no difference: no evidence
    # a seed's rows move together: six rows of one seed are one unit, whatever they say (of the 4 swaps, the
    # observed one and the one that swaps only the tied seed are as large)
    assert paired_permutation_p([1.0] * 6 + [0.0], [0.0] * 7, [0] * 6 + [1], alternative="greater") == 2 / 4


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=30),
       st.sampled_from(["greater", "less", "two-sided"]))
@settings(max_examples=100, deadline=None)
def test_sign_flip_is_symmetric_in_the_methods_and_blind_to_seed_names(rows, alternative):
    a, b, seeds = (np.array(x, dtype=float) for x in zip(*rows))
    mirror = {"greater": "less", "less": "greater", "two-sided": "two-sided"}[alternative]
    p = paired_permutation_p(a, b, seeds, alternative=alternative)
    assert 0 < p <= 1
    assert paired_permutation_p(b, a, seeds, alternative=mirror) == pytest.approx(p)
    assert paired_permutation_p(a, b, 7 - seeds, alternative=alternative) == pytest.approx(p)


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == pytest.approx([0.5]) and holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])


def _step_down(p: list[float], alpha: float) -> set[int]:
    """Holm's procedure as written: compare the k-th smallest p with alpha / (m − k), stop at the first miss."""
    rejected = set()
    for k, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
        if p[i] > alpha / (len(p) - k):
            break
        rejected.add(i)
    return rejected


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.sampled_from([0.01, 0.05, 0.1]))
@settings(max_examples=200, deadline=None)
def test_holm_rejects_what_the_step_down_procedure_rejects(p, alpha):
    adjusted = holm(p)
    assert np.all(adjusted >= np.asarray(p) - 1e-12) and np.all(adjusted <= 1)
    assert {i for i, a in enumerate(adjusted) if a <= alpha} == _step_down(p, alpha)


def test_the_detectable_difference_has_the_stated_power_under_the_test_compare_uses():
    """With one training seed: fresh experiments whose 40 per-seed differences have the observed spread
    and the detectable difference as their mean are detected by the sign-flip test in ~80 % of them;
    it is near the t-approximation, and 4x the test seeds of the same spread halve it, up to the tails."""
    rng = np.random.default_rng(7)
    observed = rng.normal(0.0, 0.3, (1, 40))
    mde = detectable_difference(observed)
    t = scipy_stats.t(df=39)
    assert mde == pytest.approx((t.ppf(0.975) + t.ppf(0.8)) * observed.std(ddof=1) / np.sqrt(40), rel=0.15)
    seeds = np.arange(40)
    hits = [paired_permutation_p(rng.normal(mde, observed.std(), 40), np.zeros(40), seeds, n_perm=999, seed=i) < 0.05
            for i in range(300)]
    assert 0.72 <= np.mean(hits) <= 0.88
    assert detectable_difference(np.tile(observed, 4)) == pytest.approx(mde / 2, rel=0.1)  # the same spread
    assert detectable_difference(observed, alternative="greater") < mde


def test_an_accuracy_difference_is_detectable_only_in_whole_problems():
    """Two methods that agree on every problem of 33 test seeds with 2 rows each: shifting every seed by a
    fraction of a problem would be 'detected' at any size. In whole problems, the sign-flip test rejects
    (two-sided, α 0.05) once 6 seeds gain one problem (p = 2/2⁶) and not at 5 (2/2⁵): so the detectable
    difference is half a problem times the gain probability q with P(Binomial(33, q) ≥ 6) = 0.8."""
    agree = np.zeros((1, 33))
    assert detectable_difference(agree) < 1e-6
    q = brentq(lambda q: scipy_stats.binom(33, q).sf(5) - 0.8, 0.01, 0.99)
    assert detectable_difference(agree, np.full(33, 0.5)) == pytest.approx(0.5 * q, rel=0.15)
    with pytest.raises(ValueError, match="one positive value per test seed"):
        detectable_difference(agree, np.full(32, 0.5))


def test_the_detectable_difference_of_several_training_seeds_counts_their_spread():
    """Three training seeds that disagree by a constant per seed: the two-level test must see that spread,
    so the difference it can detect is larger than if the seeds agreed."""
    rng = np.random.default_rng(8)
    agree = np.tile(rng.normal(0.0, 0.3, 40), (3, 1))
    disagree = agree + np.array([[-0.2], [0.0], [0.2]])
    assert detectable_difference(disagree) > 1.5 * detectable_difference(agree)
    with pytest.raises(ValueError, match="no difference is detectable"):
        detectable_difference(np.array([[0.1, -0.1, 0.2]]))  # 3 seeds: 8 swaps, no p below 1/8


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="one cluster per observation"):
        cluster_bootstrap_ci([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap_diff([1.0], [1.0, 2.0], [0])
    with pytest.raises(ValueError, match="at least 2 test seeds"):
        detectable_difference(np.array([[0.1]]))
    with pytest.raises(ValueError, match="one shape"):
        paired_permutation_p([1.0], [1.0, 2.0], [0])


@given(st.floats(-0.5, 1.5), st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_the_gap_closed_is_zero_at_the_baseline_one_at_the_reference_and_linear_between(f, seed):
    """A method that sits a fraction f of the way from the baseline to the reference on every observation
    closes f of the gap, in every bootstrap replicate: its interval is f itself."""
    rng = np.random.default_rng(seed)
    seeds = np.repeat(np.arange(20), 3)
    baseline = rng.normal(0.2, 0.1, 60)
    reference = baseline + rng.normal(0.3, 0.05, 60)
    assert gap_closed(baseline, baseline, reference, seeds)[:3] == pytest.approx((0, 0, 0), abs=1e-9)
    assert gap_closed(reference, baseline, reference, seeds) == pytest.approx((1, 1, 1))
    assert gap_closed(baseline + f * (reference - baseline), baseline, reference, seeds) == pytest.approx((f, f, f))


def test_a_gap_that_may_not_exist_has_no_bounded_fraction():
    """Fieller's case: when the baseline-to-reference gap's interval contains 0, the fraction's is (−inf, inf);
    a clear gap gives a finite interval around the estimate; no gap at all is an error."""
    rng = np.random.default_rng(3)
    seeds = np.repeat(np.arange(30), 2)
    baseline = rng.binomial(1, 0.3, 60).astype(float)
    noisy = rng.binomial(1, 0.32, 60).astype(float)
    method = rng.binomial(1, 0.5, 60).astype(float)
    assert gap_closed(method, baseline, noisy, seeds)[1:] == (-np.inf, np.inf)
    clear = np.ones(60)
    f, lo, hi = gap_closed(method, baseline, clear, seeds)
    assert np.isfinite(lo) and lo <= f <= hi
    with pytest.raises(ValueError, match="no gap to close"):
        gap_closed(method, baseline, baseline, seeds)


@pytest.mark.parametrize("n, k", [(1, 1), (5, 1), (6, 1), (8, 1), (9, 2), (17, 5), (40, 14)])
def test_the_median_interval_is_the_narrowest_pair_of_order_statistics_at_95_percent(n, k):
    """k from scipy's binomial: the interval (x_(k), x_(n+1-k)) covers the median with 1 - 2 P(B <= k-1)."""
    x = np.random.default_rng(n).exponential(size=n)
    median, lo, hi, confidence = median_interval(x)
    s = np.sort(x)
    assert (median, lo, hi) == (np.median(x), s[k - 1], s[n - k])
    assert confidence == pytest.approx(1 - 2 * scipy_stats.binom.cdf(k - 1, n, 0.5))
    assert (confidence >= 0.95) == (n >= 6)  # below 6 values: min-max, said with its lower confidence
    if n >= 6 and k < (n + 1) // 2:
        assert 1 - 2 * scipy_stats.binom.cdf(k, n, 0.5) < 0.95  # one pair further in would not reach 95 %


def test_the_median_interval_covers_a_skewed_median_as_often_as_it_says():
    """Step times are skewed (a stall slows a step): exponential values, true median ln 2."""
    rng = np.random.default_rng(0)
    hits = [lo <= np.log(2) <= hi for lo, hi in (median_interval(rng.exponential(size=9))[1:3] for _ in range(4000))]
    assert np.mean(hits) == pytest.approx(median_interval(np.arange(9.0))[3], abs=0.012)  # 0.961; 4 sd of 4000 draws


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_the_median_interval_holds_the_median(values, level):
    median, lo, hi, confidence = median_interval(values, level)
    assert min(values) <= lo <= median <= hi <= max(values) and 0 <= confidence < 1


def test_a_median_of_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="median_interval: no values"):
        median_interval([])
