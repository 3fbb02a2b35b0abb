"""The experiment's Tables 1–3 in Markdown, with a plain verdict of where IGA wins, ties or loses.

A difference between two methods counts only when it exceeds twice its standard error over seeds,
√(s_a²/n_a + s_b²/n_b); otherwise it is a tie. With 3 seeds this is a loose test, and it says so.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable

from iga.params import RunConfig
from iga.report import RunResult, _by_method, _markdown, _table1

# (header, value, sign: +1 when higher is better)
COMPARED: tuple[tuple[str, Callable[[dict[str, Any]], float], int], ...] = (
    ("ID acc.", lambda e: 100 * e["id_accuracy"], 1),
    ("OOD acc.", lambda e: 100 * e["ood_accuracy"], 1),
    ("Δ-Gap", lambda e: 100 * e["delta_gap"], -1),
    ("LCS (normalised)", lambda e: e["lcs"]["penultimate"]["normalized"], -1),
)
RULE = ("A difference counts when it exceeds twice its standard error over seeds, √(s_a²/n_a + s_b²/n_b); "
        "otherwise it is a tie. With 3 seeds and a few dozen problems per evaluation, most differences are ties.")


def compare(ours: list[float], theirs: list[float], sign: int) -> tuple[str, float]:
    """('win' | 'tie' | 'loss', mean difference ours − theirs) for a metric where sign·value is better."""
    diff = statistics.fmean(ours) - statistics.fmean(theirs)
    var = lambda v: statistics.variance(v) / len(v) if len(v) > 1 else 0.0  # noqa: E731
    se = math.sqrt(var(ours) + var(theirs))
    if abs(diff) <= 2 * se:
        return "tie", diff
    return ("win" if sign * diff > 0 else "loss"), diff


def _values(runs: list[RunResult], get: Callable[[dict[str, Any]], float]) -> list[float]:
    return [get(r.eval) for r in runs]


def verdicts(groups: dict[str, list[RunResult]], reference: str) -> tuple[str, dict[str, int]]:
    """The reference method against each other method on every compared metric, and the counts."""
    ref = groups[reference]
    counts = {"win": 0, "tie": 0, "loss": 0}
    rows = []
    for name, runs in groups.items():
        if name == reference:
            continue
        cells = []
        for _, get, sign in COMPARED:
            outcome, diff = compare(_values(ref, get), _values(runs, get), sign)
            counts[outcome] += 1
            cells.append(f"{outcome} ({diff:+.{3 if abs(diff) < 1 else 1}f})")
        rows.append([name, *cells])
    return _markdown([f"{reference} vs", *(h for h, _, _ in COMPARED)], rows), counts


def table1_with_verdicts(runs: list[RunResult], reference: str, scale: str, run_s: float) -> str:
    groups = _by_method(runs)
    text, counts = verdicts(groups, reference)
    total = sum(counts.values())
    return "\n\n".join([
        "# Table 1: IGA against the baselines", f"*{scale}. Training and evaluation of all runs of "
        f"Tables 1 and 2 took {run_s / 60:.0f} min on this machine.*", _table1(groups),
        f"## Where {reference} wins, ties or loses",
        f"Against the {len(groups) - 1} other methods on {len(COMPARED)} metrics: **{counts['win']} wins, "
        f"{counts['tie']} ties, {counts['loss']} losses** of {total} comparisons. Difference = {reference} − other "
        "(accuracies and Δ-Gap in points). " + RULE, text]) + "\n"


def describe(run: RunConfig, reference: RunConfig) -> str:
    """What an ablation changes relative to the reference run."""
    parts = []
    if run.method != reference.method:
        parts.append(f"method `{run.method}`")
    if run.data != reference.data:
        parts.append(f"data {run.data.replace('_', ' ')}")
    if run.domains != reference.domains:
        parts.append(f"domains {', '.join(run.domains or ('all',))}")
    if run.split != reference.split:
        parts.append(f"{run.split}-level split (leaks: inflated ID)")
    return "; ".join(parts) or "nothing"


def table2(reference_runs: list[RunResult], ablations: dict[str, list[RunResult]], configs: dict[str, RunConfig],
           scale: str) -> str:
    """Each ablation's metrics and its difference from full IGA (ablation − IGA) with the verdict."""
    ref_config = configs["iga"]
    header = ["Ablation", "Changes", *(h for h, _, _ in COMPARED), *(f"Δ {h}" for h, _, _ in COMPARED)]

    def cells(runs: list[RunResult]) -> list[str]:
        out = []
        for h, get, _ in COMPARED:
            v = _values(runs, get)
            d = 3 if "LCS" in h else 1
            out.append(f"{statistics.fmean(v):.{d}f}" + (f" ± {statistics.stdev(v):.{d}f}" if len(v) > 1 else ""))
        return out

    rows = [["iga (full)", "–", *cells(reference_runs), *["–"] * len(COMPARED)]]
    for name, runs in ablations.items():
        deltas = []
        for h, get, sign in COMPARED:
            outcome, diff = compare(_values(runs, get), _values(reference_runs, get), sign)
            deltas.append(f"{diff:+.{3 if 'LCS' in h else 1}f} ({outcome})")
        rows.append([name, describe(configs[name], ref_config), *cells(runs), *deltas])
    return "\n\n".join(["# Table 2: IGA ablations", f"*{scale}.*", _markdown(header, rows),
                        "*Δ = ablation − full IGA; win/tie/loss is the ablation's, by the rule below. LCS of every "
                        "run is measured on the same seed-level held-out groups (for the instance-level split "
                        "some of them were seen in training).* " + RULE]) + "\n"


def table3(cost: dict[str, Any]) -> str:
    """Step time and peak memory per method on one batch, relative to ERM."""
    methods = cost["methods"]
    erm = methods["erm"]
    device = erm["device"]
    memory = "peak GPU memory allocated" if device == "cuda" else "peak resident memory above the loaded model"
    rows = [[m, f"{c['step_time_s']:.2f}", f"{c['step_time_s'] / erm['step_time_s']:.2f}×", f"{c['peak_mb']:.0f}",
             f"{c['peak_mb'] / erm['peak_mb']:.2f}×"] for m, c in methods.items()]
    same = sorted(r for r, m in cost["runs"].items() if m == "erm" and r != "erm")
    return "\n\n".join([
        "# Table 3: cost per step relative to ERM",
        f"*One batch ({erm['sequences']} sequences, {erm['tokens']} tokens), the same for every method, on "
        f"{device}; each method in its own fresh process, one warm-up step, then the median of "
        f"{len(erm['step_times_s'])} timed steps. Memory: {memory}, in MB.*",
        _markdown(["Method", "Step time (s)", "× ERM", "Peak memory (MB)", "× ERM"], rows),
        f"*{', '.join(same)} train ERM on other data: per batch they cost what ERM costs.*" if same else "",
    ]).rstrip() + "\n"
