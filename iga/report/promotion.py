"""Who should be `champion`: a challenger replaces the incumbent only on evidence.

Both are scored on the same held-out problems; the challenger must be better by a one-sided paired
test at `alpha` over test seeds (the sign-flip test of iga.eval.scores.compare: a seed's isomers are
one unit, not independent problems), with Holm's correction when several challengers try at once,
*and* by at least `min_delta`. Anything less —
a tie, a small gain, a gain within the noise — keeps the incumbent. Pure: the registry I/O is in
tasks/registry.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from iga.eval.scores import Comparison, Evaluation, compare, units_of
from iga.stats import holm

# registry.primary_metric -> (figure of iga.eval.scores, +1 when higher is better, display scale, unit, decimals)
PRIMARY = {"ood_accuracy": ("ood_accuracy", 1, 100.0, " pp", 1), "ood_nll": ("nll_ood", -1, 1.0, " nats/token", 3)}


@dataclass(frozen=True)
class Trial:
    """One challenger against the incumbent."""
    challenger: str  # a version (or any name)
    comparison: Comparison  # challenger − incumbent, p one-sided (Holm-adjusted)
    improvement: float  # in the metric's units, > 0 when the challenger is better
    promoted: bool

    def describe(self, metric: str) -> str:
        _, _, scale, unit, decimals = PRIMARY[metric]
        return self.comparison.describe(scale, unit, decimals)


@dataclass(frozen=True)
class Decision:
    incumbent: str
    winner: str  # the incumbent unless a challenger was promoted
    trials: list[Trial]


def decide(incumbent: str, evaluations: dict[str, Evaluation], metric: str, alpha: float, min_delta: float
           ) -> Decision:
    """Test every other entry of `evaluations` against `incumbent`'s; promote the challenger with the
    largest improvement among those significant after Holm's correction and at least `min_delta` better."""
    figure, sign, *_ = PRIMARY[metric]
    challengers = [name for name in evaluations if name != incumbent]
    raw = [compare([evaluations[c]], [evaluations[incumbent]], figure, alternative="greater" if sign > 0 else "less")
           for c in challengers]
    adjusted = holm([c.p for c in raw]) if raw else []
    trials = []
    for name, comparison, p in zip(challengers, raw, adjusted):
        comparison = Comparison(comparison.figure, comparison.delta, comparison.lo, comparison.hi, float(p),
                                comparison.n, comparison.test + (f", Holm over {len(raw)}" if len(raw) > 1 else ""))
        improvement = sign * comparison.delta
        trials.append(Trial(name, comparison, improvement, p < alpha and improvement >= min_delta))
    eligible = [t for t in trials if t.promoted]
    best = max(eligible, key=lambda t: t.improvement) if eligible else None
    trials = [Trial(t.challenger, t.comparison, t.improvement, t is best) for t in trials]
    return Decision(incumbent, best.challenger if best else incumbent, trials)


def best(evaluations: dict[str, Evaluation], metric: str) -> str | None:
    """The entry with the best point estimate of `metric` (no test: for the first champion when no
    baseline was trained, and for `challenger`); None when there is none."""
    figure, sign, *_ = PRIMARY[metric]
    return max(evaluations, key=lambda name: sign * float(units_of(figure, evaluations[name]).values.mean()),
               default=None)
