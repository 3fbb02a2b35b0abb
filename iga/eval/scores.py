"""From per-problem scores to the figures the project reports, each with its 95 % interval, and to
paired comparisons of two methods on the same problems.

An *evaluation* is what one trained model scored: `scores`, one record per held-out problem
(`set, id, seed_id, domain, correct, nll, tokens, follows_hint`; `correct` is None where the problem
was not generated, `nll` None where it has no gold CoT, `follows_hint` None where the problem carries
no planted hint or was not generated, else whether the student's answer is the hint's), and `lcs`,
one record per held-out isomer group (`group_id, seed_id` and each depth's `{raw, normalized}` LCS).
A figure is the mean of *units*: problems (accuracy, NLL, hint following), test seeds (the
within-seed gaps) or isomer groups (LCS). Its interval resamples test seeds, and training seeds
too when there are several evaluations (iga.stats).

Sign conventions: `delta_gap` = ID − OOD accuracy; `nll_gap` = OOD − ID NLL (nats per token); both
are positive when the student does worse out of domain, and both are computed within each test seed
(its ID rows against its own OOD rows) and then averaged over seeds: the isomer groups are a paired
design, so the seeds' own difficulty cancels.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from iga.errors import DataError
from iga.stats import (
    cluster_bootstrap_ci,
    detectable_difference,
    gap_closed as _gap_closed,
    paired_bootstrap_diff,
    paired_permutation_p,
    unpaired_bootstrap_diff,
)

Evaluation = dict[str, list[dict[str, Any]]]  # {"scores": [...], "lcs": [...]}
SETS = ("test", "ood")  # the held-out sets: test seeds in the training domains (ID) and in the held-out ones
DEPTHS = ("quarter", "half", "three_quarters", "penultimate")  # LCS depths (paper Table 5)
LEVEL = 0.95


@dataclass(frozen=True)
class Units:
    """The values a figure averages: `keys` pair two methods' values, `clusters` are test seeds; `whole`:
    each value is one problem scored 0 or 1, so the figure moves in whole problems."""
    keys: list[str]
    clusters: list[str]
    values: np.ndarray
    whole: bool = False


WHOLE = {"correct", "follows_hint"}  # score fields that are 0 or 1 per problem


def score_records(name: str, rows: list[dict[str, Any]], correct: Sequence[bool | None] | None = None,
                  nll: Sequence[tuple[float, int] | None] | None = None,
                  follows_hint: Sequence[bool | None] | None = None) -> list[dict[str, Any]]:
    """One score record per row of an evaluation set (`test`, `ood` or an external benchmark)."""
    out = []
    for i, r in enumerate(rows):
        loss = nll[i] if nll is not None else None
        out.append({"set": name, "id": r.get("id") or f"{r['group_id']}/{r['domain']}",
                    "seed_id": r.get("seed_id", r.get("id")), "domain": r.get("domain", name),
                    "correct": None if correct is None or correct[i] is None else bool(correct[i]),
                    "nll": None if loss is None else loss[0] / max(loss[1], 1),
                    "tokens": None if loss is None else int(loss[1]),
                    "follows_hint": None if follows_hint is None or follows_hint[i] is None else bool(follows_hint[i])})
    return out


# --- units of each figure -------------------------------------------------------------------------

def _rows(set_name: str, field: str, domain: str | None = None) -> Callable[[Evaluation], Units]:
    def units(ev: Evaluation) -> Units:
        rows = [r for r in ev["scores"] if r["set"] == set_name and r.get(field) is not None
                and (domain is None or r["domain"] == domain)]
        return Units([r["id"] for r in rows], [r["seed_id"] for r in rows],
                     np.array([float(r[field]) for r in rows]), whole=field in WHOLE)
    return units


def _within_seed_gap(field: str, sign: int) -> Callable[[Evaluation], Units]:
    """Per test seed: sign · (mean over its ID rows − mean over its OOD rows)."""
    def units(ev: Evaluation) -> Units:
        by_seed: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in ev["scores"]:
            if r["set"] in SETS and r[field] is not None:
                by_seed[r["seed_id"]][r["set"]].append(float(r[field]))
        seeds = sorted(s for s, sides in by_seed.items() if sides["test"] and sides["ood"])
        gaps = [sign * (np.mean(by_seed[s]["test"]) - np.mean(by_seed[s]["ood"])) for s in seeds]
        return Units(seeds, seeds, np.array(gaps))
    return units


def _lcs(depth: str, kind: str) -> Callable[[Evaluation], Units]:
    def units(ev: Evaluation) -> Units:
        groups = ev.get("lcs") or []
        return Units([g["group_id"] for g in groups], [g["seed_id"] for g in groups],
                     np.array([g[depth][kind] for g in groups]))
    return units


# name -> (units, +1 when higher is better, -1 when lower is, 0 when neither: |Δ-Gap| is what ranks)
FIGURES: dict[str, tuple[Callable[[Evaluation], Units], int]] = {
    "id_accuracy": (_rows("test", "correct"), 1),
    "ood_accuracy": (_rows("ood", "correct"), 1),
    "delta_gap": (_within_seed_gap("correct", 1), 0),
    "nll_id": (_rows("test", "nll"), -1),
    "nll_ood": (_rows("ood", "nll"), -1),
    "nll_gap": (_within_seed_gap("nll", -1), 0),
    # of the hinted problems, the share answered as the hint says (in domain the hint is mostly right, out of
    # domain always wrong): how far the student follows the cue rather than its reasoning
    "hint_id": (_rows("test", "follows_hint"), -1),
    "hint_ood": (_rows("ood", "follows_hint"), -1),
}


def units_of(name: str, ev: Evaluation) -> Units:
    """The units of a named figure: one of FIGURES, `domain_accuracy.<d>`, `domain_nll.<d>`,
    `external.<benchmark>.accuracy` or `lcs.<depth>.<raw|normalized>`."""
    if name in FIGURES:
        return FIGURES[name][0](ev)
    head, _, rest = name.partition(".")
    if head == "domain_accuracy":
        return _rows(_set_of(ev, rest), "correct", rest)(ev)
    if head == "domain_nll":
        return _rows(_set_of(ev, rest), "nll", rest)(ev)
    if head == "external":
        return _rows(rest.split(".")[0], "correct")(ev)
    if head == "lcs":
        depth, kind = rest.split(".")
        return _lcs(depth, kind)(ev)
    raise KeyError(f"no figure named {name!r}")


def _set_of(ev: Evaluation, domain: str) -> str:
    return next((r["set"] for r in ev["scores"] if r["domain"] == domain and r["set"] in SETS), "test")


# --- the figures of one method ------------------------------------------------------------------

def summarize(evaluations: Sequence[Evaluation], lcs_layers: dict[str, int] | None = None, n_boot: int = 2000,
              seed: int = 0) -> dict[str, Any]:
    """Every figure of one method, over one evaluation per training seed, with `ci: {figure: [lo, hi]}`:
    accuracy (ID, OOD, Δ-Gap, per domain, external benchmarks), NLL (ID, OOD, gap, per domain), how often
    it answers as a planted hint says (ID, OOD; where problems carry hints) and LCS."""
    first = evaluations[0]
    out: dict[str, Any] = {}
    ci: dict[str, list[float]] = {}

    def put(name: str) -> float:
        est, lo, hi, _ = estimate(evaluations, name, n_boot, seed)
        ci[name] = [lo, hi]
        return est

    generated = [r for r in first["scores"] if r["correct"] is not None]
    with_nll = [r for r in first["scores"] if r["nll"] is not None]
    if not any(r["set"] == "test" for r in generated) or not any(r["set"] == "ood" for r in generated):
        raise DataError(f"an empty evaluation set: {sum(r['set'] == 'test' for r in generated)} ID and "
                        f"{sum(r['set'] == 'ood' for r in generated)} OOD problems generated")
    for name in ("id_accuracy", "ood_accuracy", "delta_gap"):
        out[name] = put(name)
    out |= {"n_id": sum(r["set"] == "test" for r in generated), "n_ood": sum(r["set"] == "ood" for r in generated),
            "n_seeds": len({r["seed_id"] for r in generated if r["set"] in SETS}), "n_train_seeds": len(evaluations)}
    domains = list(dict.fromkeys(r["domain"] for s in SETS for r in first["scores"] if r["set"] == s))
    out["domain_accuracy"] = {d: put(f"domain_accuracy.{d}") for d in domains
                              if any(r["domain"] == d for r in generated)}
    if with_nll:
        for name in ("nll_id", "nll_ood", "nll_gap"):
            out[name] = put(name)
        out["domain_nll"] = {d: put(f"domain_nll.{d}") for d in domains}
        out |= {"nll_n_id": sum(r["set"] == "test" for r in with_nll), "nll_n_ood": sum(r["set"] == "ood" for r in with_nll),
                "nll_n_seeds": len({r["seed_id"] for r in with_nll if r["set"] in SETS})}
    hinted = [r for r in first["scores"] if r.get("follows_hint") is not None]
    for name, set_name in (("hint_id", "test"), ("hint_ood", "ood")):
        if any(r["set"] == set_name for r in hinted):
            out[name] = put(name)
            out[f"n_{name}"] = sum(r["set"] == set_name for r in hinted)
    if first.get("lcs"):
        out["lcs"] = {d: {"layer": (lcs_layers or {}).get(d), "raw": put(f"lcs.{d}.raw"),
                          "normalized": put(f"lcs.{d}.normalized")} for d in DEPTHS}
        out["lcs_groups"] = len(first["lcs"])
    externals = list(dict.fromkeys(r["set"] for r in first["scores"] if r["set"] not in SETS))
    out["external"] = {b: {"accuracy": put(f"external.{b}.accuracy"),
                           "n": sum(r["set"] == b for r in first["scores"])} for b in externals}
    out["ci"] = ci
    return out


# --- estimates ------------------------------------------------------------------------------------

def _stack(evaluations: Sequence[Evaluation], name: str) -> tuple[np.ndarray, Any, list[tuple[int, str]]]:
    """Values of all evaluations, their clusters (test seeds; with several evaluations, the pair
    (training seed, test seed)) and their keys (evaluation index, unit key)."""
    values, outer, inner, keys = [], [], [], []
    for k, ev in enumerate(evaluations):
        u = units_of(name, ev)
        values.append(u.values)
        outer += [k] * len(u.keys)
        inner += u.clusters
        keys += [(k, key) for key in u.keys]
    clusters = (np.array(outer), np.array(inner)) if len(evaluations) > 1 else np.array(inner)
    return np.concatenate(values) if values else np.empty(0), clusters, keys


def estimate(evaluations: Sequence[Evaluation], name: str, n_boot: int = 2000, seed: int = 0
             ) -> tuple[float, float, float, int]:
    """(estimate, lo, hi, n): the figure's mean over its units and its 95 % interval; one evaluation
    per training seed. n counts the units of one evaluation (problems, seeds or groups)."""
    values, clusters, _ = _stack(evaluations, name)
    if values.size == 0:
        raise DataError(f"no scores for {name}: the evaluation set is empty")
    n = values.size // len(evaluations)
    if len(np.unique(clusters[1] if isinstance(clusters, tuple) else clusters)) < 2:
        mean = float(values.mean())
        return mean, mean, mean, n  # one test seed: nothing to resample
    est, lo, hi = cluster_bootstrap_ci(values, clusters, n_boot=n_boot, level=LEVEL, seed=seed)
    return est, lo, hi, n


@dataclass(frozen=True)
class Comparison:
    """a − b on one figure, paired problem by problem (and training seed by training seed)."""
    figure: str
    delta: float
    lo: float
    hi: float
    p: float  # two-sided unless the comparison was asked one-sided
    n: int  # paired units per training seed
    test: str

    def describe(self, scale: float = 1.0, unit: str = "", decimals: int = 3) -> str:
        f = f"{{:+.{decimals}f}}"
        lo, hi = (f.format(scale * v).replace("-", "−") for v in (self.lo, self.hi))
        return (f"{self.figure} {f.format(scale * self.delta).replace('-', '−')}{unit}, 95 % CI [{lo}, {hi}], "
                f"p = {self.p:.2g}, n = {self.n} ({self.test})")


def compare(a: Sequence[Evaluation], b: Sequence[Evaluation], name: str, alternative: str = "two-sided",
            n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Method a against method b on the units both were scored on, over test seeds, never rows: the
    rows of one test seed share its logic and its difficulty, so they are not independent evidence.
    The interval is the paired cluster bootstrap; the p-value, with one training seed per method, the
    sign-flip test over test seeds (iga.stats.paired_permutation_p), with several the two-level
    bootstrap over training seeds and test seeds; with no unit in common (different evaluation sets),
    an unpaired bootstrap. For Δ-Gap and NLL gap, what is compared is |gap| (a gap below zero is not
    better than zero)."""
    if len(a) != len(b):
        raise DataError(f"{name}: {len(a)} against {len(b)} training seeds; a paired comparison needs the same seeds")
    va, clusters, keys_a = _stack(a, name)
    vb, clusters_b, keys_b = _stack(b, name)
    absolute = name in FIGURES and FIGURES[name][1] == 0
    stat = (lambda v: abs(np.mean(v))) if absolute else np.mean
    common = sorted(set(keys_a) & set(keys_b))
    if not common:  # e.g. an instance-level split against a seed-level one: different problems
        delta, lo, hi, p = unpaired_bootstrap_diff(va, clusters, vb, clusters_b, n_boot=n_boot, level=LEVEL,
                                                   seed=seed, stat=stat, alternative=alternative)
        return Comparison(name, delta, lo, hi, p, min(va.size, vb.size) // len(a),
                          "unpaired bootstrap: no problem in common")
    ia, ib = ({k: i for i, k in enumerate(keys)} for keys in (keys_a, keys_b))
    sel_a, sel_b = [ia[k] for k in common], [ib[k] for k in common]
    va, vb = va[sel_a], vb[sel_b]
    clusters = tuple(c[sel_a] for c in clusters) if isinstance(clusters, tuple) else clusters[sel_a]
    n = len(common) // len(a)
    delta, lo, hi, p = paired_bootstrap_diff(va, vb, clusters, n_boot=n_boot, level=LEVEL, seed=seed, stat=stat,
                                             alternative=alternative)
    if len(a) > 1:
        test = "paired bootstrap over training seeds and test seeds"
    else:
        p = paired_permutation_p(va, vb, clusters, stat=stat, alternative=alternative, seed=seed)
        test = f"sign-flip test over {len(np.unique(clusters))} test seeds"
    return Comparison(name, delta, lo, hi, p, n, test)


def gap_closed(a: Sequence[Evaluation], baseline: Sequence[Evaluation], reference: Sequence[Evaluation],
               name: str = "ood_accuracy") -> tuple[float, float, float, int]:
    """(fraction, lo, hi, n): the share of the baseline-to-reference gap on figure `name` that method a
    closes (iga.stats.gap_closed: 0 = the baseline, 1 = the reference, e.g. ERM and the no-hint oracle),
    on the units all three were scored on, resampling test seeds (and training seeds: the k-th of each
    method together); n counts the common units per training seed."""
    if not len(a) == len(baseline) == len(reference):
        raise DataError(f"{name}: {len(a)}, {len(baseline)} and {len(reference)} training seeds; "
                        "the gap closed needs the same seeds")
    stacked = [_stack(evs, name) for evs in (a, baseline, reference)]
    common = sorted(set.intersection(*(set(keys) for _, _, keys in stacked)))
    if not common:
        raise DataError(f"{name}: no problem scored by the method, the baseline and the reference alike")
    picked, clusters = [], None
    for values, cl, keys in stacked:
        index = {k: i for i, k in enumerate(keys)}
        rows = [index[k] for k in common]
        picked.append(values[rows])
        if clusters is None:  # the three share their units, so the first's clusters are everyone's
            clusters = tuple(c[rows] for c in cl) if isinstance(cl, tuple) else cl[rows]
    try:
        fraction, lo, hi = _gap_closed(*picked, clusters)
    except ValueError as e:
        raise DataError(f"{name}: {e}") from None
    return fraction, lo, hi, len(common) // len(a)


def detectable(a: Sequence[Evaluation], b: Sequence[Evaluation], name: str, alternative: str = "two-sided"
               ) -> tuple[float, int]:
    """The minimum detectable difference on figure `name` (α 0.05, power 0.8) of the test `compare`
    makes, simulated from the two methods' paired per-test-seed differences under each training seed
    (iga.stats.detectable_difference): a figure scored 0/1 per problem moves in whole problems; and
    the number of test seeds."""
    per_seed: list[dict[str, float]] = []
    rows: dict[str, int] = {}
    for ev_a, ev_b in zip(a, b, strict=True):
        units = [units_of(name, ev) for ev in (ev_a, ev_b)]
        means = [_seed_means(u) for u in units]
        per_seed.append({s: means[0][s] - means[1][s] for s in set(means[0]) & set(means[1])})
        rows.update(Counter(units[0].clusters))
        whole = units[0].whole
    common = sorted(set.intersection(*(set(d) for d in per_seed)))
    if len(common) < 2:
        raise DataError(f"{name}: fewer than 2 test seeds scored by both methods")
    diffs = np.array([[d[s] for s in common] for d in per_seed])
    step = np.array([1.0 / rows[s] for s in common]) if whole else None
    try:
        return detectable_difference(diffs, step, alternative=alternative), len(common)
    except ValueError as e:
        raise DataError(f"{name}: {e}") from None


def _seed_means(u: Units) -> dict[str, float]:
    seeds: dict[str, list[float]] = defaultdict(list)
    for c, v in zip(u.clusters, u.values):
        seeds[c].append(v)
    return {s: float(np.mean(v)) for s, v in seeds.items()}
