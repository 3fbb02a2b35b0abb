"""The experiment's Tables 1–3 in Markdown, with a verdict of where IGA wins, ties or loses.

A verdict compares two methods paired problem by problem and training seed by training seed
(iga.eval.scores.compare: a two-level bootstrap over training seeds and test seeds). A difference is a
win or a loss only when it stays significant after Holm's correction over all the table's
comparisons; otherwise it is a tie. Δ-Gap and NLL gap are ranked by their size |gap|: a gap below
zero (OOD above ID) is not better than no gap.
"""
from __future__ import annotations

import math
from typing import Any, Collection, Sequence

import numpy as np

from iga.errors import DataError
from iga.eval.scores import Comparison, Evaluation, compare, gap_closed
from iga.params import RunConfig
from iga.report.report import Summaries, detectable_or_none, figure_cell, markdown, results_table
from iga.stats import holm, median_interval

ALPHA = 0.05
# (header, figure, +1 higher is better / −1 lower is better (|gap| for the gaps), display scale, decimals)
COMPARED: tuple[tuple[str, str, int, float, int], ...] = (
    ("ID acc.", "id_accuracy", 1, 100, 1),
    ("OOD acc.", "ood_accuracy", 1, 100, 1),
    ("|Δ-Gap|", "delta_gap", -1, 100, 1),
    ("NLL OOD", "nll_ood", -1, 1, 3),
    ("|NLL gap|", "nll_gap", -1, 1, 3),
    ("LCS (normalised)", "lcs.penultimate.normalized", -1, 1, 4),
)
RULE = ("Each cell: difference, its 95 % interval, and the verdict. A win or a loss only when the paired difference "
        f"is significant at {ALPHA} after Holm's correction over all comparisons of the table (p_H, the adjusted "
        "p-value); otherwise a tie. Paired by training seed and problem (test seed for the gaps, isomer group for "
        "LCS); intervals from a bootstrap over training seeds and test seeds. |Δ-Gap| and |NLL gap| rank a gap by "
        "its size: a negative gap (OOD above ID) is not better than zero. Accuracies and Δ-Gap in points, NLL in "
        "nats per token.")


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def shown(expected: Sequence[tuple[str, int, int]], present: Collection[tuple[str, int, int]], runs: Sequence[str],
          required: Sequence[str], table: str) -> tuple[list[int], list[str]]:
    """What a table can show of a matrix that has not finished (`expected` and `present` its (run, draw, seed)
    cells): (the training seeds, the runs left out). A table pairs its runs training seed by training seed, and
    a (run, seed) counts only with every one of its draws, since selection picks among them all; so the seeds
    shown are those every run with a complete seed shares, and a run without one is left out. Refused, naming
    them, when a `required` run (the one every other is compared with) is left out or the runs share no seed."""
    complete = {run: {s for r, _, s in expected if r == run} - {s for r, d, s in expected
                                                                if r == run and (r, d, s) not in present}
                for run in runs}
    left_out = [run for run in runs if not complete[run]]
    if missing := [run for run in required if run in left_out]:
        raise DataError(f"{table}: {', '.join(missing)} has no training seed with every draw run; "
                        "it is what the table compares with: run its pairs first (`dvc status` lists them)")
    seeds = sorted(set.intersection(*(complete[run] for run in runs if run not in left_out)))
    if not seeds:
        raise DataError(f"{table}: the runs that have run share no training seed ("
                        + "; ".join(f"{run}: {sorted(complete[run])}" for run in runs if run not in left_out) + ")")
    return seeds, left_out


def partial_note(not_run: Sequence[str], n_pairs: int, seeds: Sequence[int], left_out: Sequence[str]) -> str:
    """The banner of a table made before the whole matrix ran ("" when it has): what it rests on and what not."""
    if not not_run:
        return ""
    return (f"**Partial: {n_pairs - len(not_run)} of {n_pairs} pairs have run.** Shown: "
            f"{plural('training seed', len(seeds))} {', '.join(map(str, seeds))}, the ones every run below has finished"
            + (f"; not run yet: {', '.join(left_out)}" if left_out else "")
            + f". {len(not_run)} {plural('pair', len(not_run))} to go: `dvc status` names what is left, "
              "`dvc repro tables` runs it.")


def resamples(comparisons: int) -> int:
    """Bootstrap replicates that put the smallest two-sided p (2 / (n + 1)) ten times below α / comparisons."""
    return max(2000, math.ceil(20 * comparisons / ALPHA))


def verdicts(pairs: Sequence[tuple[str, Sequence[Evaluation], Sequence[Evaluation]]]
             ) -> dict[tuple[str, str], tuple[Comparison, float, str]]:
    """Every (row name, figure) of a table: (comparison ours − theirs, Holm-adjusted p, verdict).

    Over several training seeds a p-value is a bootstrap tail fraction, never below 2 / (n_boot + 1): at
    compare's 2000 replicates and Holm over 66 comparisons no verdict could be significant (66 x 0.001 >
    0.05). Every comparison whose p is below α, the only ones Holm could call, is drawn again with enough
    replicates (`resamples`). With one training seed the sign-flip test's floor, 1 / 4001, allows 200."""
    n_boot = resamples(len(pairs) * len(COMPARED))

    def judged(ours: Sequence[Evaluation], theirs: Sequence[Evaluation], figure: str) -> Comparison:
        c = compare(ours, theirs, figure)
        return compare(ours, theirs, figure, n_boot=n_boot) if len(ours) > 1 and c.p < ALPHA else c

    raw = {(name, figure): judged(ours, theirs, figure)
           for name, ours, theirs in pairs for _, figure, _, _, _ in COMPARED}
    adjusted = holm([c.p for c in raw.values()])
    sign = {figure: s for _, figure, s, _, _ in COMPARED}
    out = {}
    for (key, c), p in zip(raw.items(), adjusted):
        better = sign[key[1]] * c.delta > 0
        out[key] = (c, float(p), ("win" if better else "loss") if p < ALPHA else "tie")
    return out


def _cell(result: tuple[Comparison, float, str], scale: float, decimals: int) -> str:
    c, p, verdict = result
    f = lambda v: f"{scale * v:+.{decimals}f}"  # noqa: E731
    shown = f"**{verdict}**" if verdict != "tie" else verdict
    return f"{f(c.delta)} [{f(c.lo)}, {f(c.hi)}] {shown} (p_H {p:.2g})"


def _counts(results: dict[Any, tuple[Comparison, float, str]]) -> dict[str, int]:
    counts = {"win": 0, "tie": 0, "loss": 0}
    for _, _, verdict in results.values():
        counts[verdict] += 1
    return counts


def detectable_line(pairs: Sequence[tuple[str, Sequence[Evaluation], Sequence[Evaluation]]]) -> str:
    """The median over the table's comparisons of the minimum detectable difference (α 0.05, power 0.8)."""
    parts, seeds = [], set()
    for header, figure, _, scale, decimals in COMPARED:
        if figure.startswith("lcs"):
            continue
        found = [detectable_or_none(ours, theirs, figure) for _, ours, theirs in pairs]
        values = [mde for mde, n in filter(None, found)]
        if not values:
            continue
        seeds |= {n for _, n in filter(None, found)}
        unit = " points" if scale == 100 else " nats/token"
        parts.append(f"{header.strip('|')} {scale * float(np.median(values)):.{decimals}f}{unit}")
    if not parts:
        return "*Minimum detectable difference: none at this size (too few test seeds for the test at α 0.05).*"
    n = "/".join(map(str, sorted(seeds)))
    return (f"*Minimum detectable difference (α 0.05, power 0.8; median over the comparisons; the table's test "
            f"simulated from the paired per-test-seed differences over {n} test seeds and the training seeds): "
            + ", ".join(parts) + ".*")


def table1(summaries: Summaries, evaluations: dict[str, list[Evaluation]], reference: str, scale: str,
           run_s: dict[str, float], oracle: str | None = None, rule: str = "training-domain validation",
           partial: str = "") -> str:
    """Table 1 under a model-selection `rule` with every figure's interval, then the reference method against
    each other one; with an `oracle` run (no hints), each run's share of ERM's gap to it, the oracle apart from
    the verdicts. `run_s`: the runs' seconds of training and evaluation by the device that ran them.
    `partial`: the banner of a matrix that has not finished (partial_note)."""
    pairs = [(name, evaluations[reference], evals) for name, evals in evaluations.items()
             if name not in (reference, oracle)]
    results = verdicts(pairs)
    counts = _counts(results)
    rows = [[name, *(_cell(results[(name, figure)], s, d) for _, figure, _, s, d in COMPARED)]
            for name, _, _ in pairs]
    return "\n\n".join([
        f"# Table 1: IGA against the baselines, {rule}", *filter(None, [partial]),
        f"*{scale}. Training and evaluation of the pairs of Tables 1 and 2 that have run took "
        f"{sum(run_s.values()) / 60:.0f} min: " + ", ".join(f"{t / 60:.0f} on {device}" for device, t in run_s.items())
        + ".*", results_table(summaries),
        f"## Where {reference} wins, ties or loses",
        f"Against the {len(pairs)} other methods on {len(COMPARED)} figures: **{counts['win']} wins, "
        f"{counts['tie']} ties, {counts['loss']} losses** of {sum(counts.values())} comparisons. Difference = "
        f"{reference} − other; the verdict is {reference}'s. " + RULE,
        markdown([f"{reference} vs", *(h for h, _, _, _, _ in COMPARED)], rows),
        detectable_line(pairs), *([gap_section(evaluations, oracle)] if oracle else [])]) + "\n"


def gap_section(evaluations: dict[str, list[Evaluation]], oracle: str, baseline: str = "erm") -> str:
    """The benchmark's own test (does the baseline fall below the no-hint oracle out of domain?) and each
    run's fraction of that gap closed (iga.eval.scores.gap_closed), with 95 % intervals."""
    gap = compare(evaluations[oracle], evaluations[baseline], "ood_accuracy")
    head = (f"## The gap to the no-hint oracle\n\n`{oracle}` trains {baseline} on the same problems without their "
            f"hints: what the reasoning alone gives. {oracle} − {baseline}, OOD accuracy: "
            f"{gap.describe(100, ' points', 1)}.")
    if gap.delta == 0:
        return head + f" No gap: {baseline} and the oracle answer alike out of domain, there is nothing to close."
    rows = []
    for name, evals in evaluations.items():
        if name in (oracle, baseline):
            continue
        fraction, lo, hi, n = gap_closed(evals, evaluations[baseline], evaluations[oracle])
        interval = "(−∞, ∞): the gap's own interval contains 0" if np.isinf(lo) else f"[{lo:.2f}, {hi:.2f}]"
        rows.append([name, f"{fraction:+.2f}", interval, str(n)])
    return "\n\n".join([
        head, f"Fraction of the gap closed = (run − {baseline}) / ({oracle} − {baseline}) on OOD accuracy, on the "
        "problems all three answered: 0 is ERM, 1 the oracle; its 95 % interval from one bootstrap of training "
        "seeds and test seeds for all three (Fieller: unbounded when the gap may be 0).",
        markdown(["Run", "Gap closed", "95 % interval", "OOD problems"], rows)])


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
        parts.append(f"{run.split}-level split (a seed's instances on both sides; test rows of its own)")
    return "; ".join(parts) or "nothing"


def table2(summaries: Summaries, evaluations: dict[str, list[Evaluation]], configs: dict[str, RunConfig],
           reference: str, scale: str, partial: str = "") -> str:
    """Each ablation's figures and its paired difference from full IGA (ablation − IGA) with the verdict;
    `partial` as in table1 (with no ablation run yet, the banner alone)."""
    ablations = [name for name in evaluations if name != reference]
    if partial and not ablations:
        return f"# Table 2: IGA ablations\n\n{partial}\n"
    pairs = [(name, evaluations[name], evaluations[reference]) for name in ablations]
    results = verdicts(pairs)
    header = ["Ablation", "Changes", *(h for h, _, _, _, _ in COMPARED)]
    rows = [[f"{reference} (full)", "–", *(figure_cell(summaries[reference], f, s, d) for _, f, _, s, d in COMPARED)]]
    for name in ablations:
        rows.append([name, describe(configs[name], configs[reference]),
                     *(figure_cell(summaries[name], f, s, d) for _, f, _, s, d in COMPARED)])
    deltas = [[name, *(_cell(results[(name, figure)], s, d) for _, figure, _, s, d in COMPARED)] for name in ablations]
    counts = _counts(results)
    return "\n\n".join([
        "# Table 2: IGA ablations", *filter(None, [partial]),
        f"*{scale}. Figures with their 95 % intervals; |Δ-Gap| and |NLL gap| are the gaps' sizes.*",
        markdown(header, rows),
        f"## Each ablation against full {reference}",
        f"**{counts['win']} wins, {counts['tie']} ties, {counts['loss']} losses** for the ablations, of "
        f"{sum(counts.values())} comparisons. Difference = ablation − {reference}; the verdict is the ablation's. "
        + RULE + " LCS of every run is measured on the same seed-level held-out groups (for the instance-level "
        "split some of them were seen in training).",
        markdown(["Ablation vs full", *(h for h, _, _, _, _ in COMPARED)], deltas), *filter(None, [fewer_line(results)]),
        detectable_line(pairs)]) + "\n"


def fewer_line(results: dict[tuple[str, str], tuple[Comparison, float, str]]) -> str:
    """The runs whose accuracies are compared on fewer problems than the table's others (an instance-level split
    has test rows of its own: only the problems both runs answered pair), with how many, or ""."""
    figures = {"id_accuracy": "ID", "ood_accuracy": "OOD"}
    n = {key: comparison.n for key, (comparison, _, _) in results.items()}
    most = {f: max((v for (_, figure), v in n.items() if figure == f), default=0) for f in figures}
    fewer = {name: [f"{n[(name, f)]} of {most[f]} {figures[f]}" for f in figures if n[(name, f)] < most[f]]
             for name in dict.fromkeys(name for name, _ in results)}
    named = [f"{name} on {' and '.join(counts)} problems" for name, counts in fewer.items() if counts]
    return ("*Accuracies compared on the problems both runs answered: " + "; ".join(named) + ".*") if named else ""


def table3(cost: dict[str, Any]) -> str:
    """Step time and peak memory per method relative to ERM: the median over rounds (tasks/cost.py) of the method's
    step time over that of ERM's step beside it on the same batch, with the median's 95 % interval."""
    methods = cost["methods"]
    erm = methods["erm"]
    memory = "peak GPU memory allocated" if cost["device"] == "cuda" else "peak resident memory above the loaded model"
    rounds = len(cost["tokens"])
    rows, confidence = [], 1.0
    for m, c in methods.items():
        t, t_lo, t_hi, t_conf = median_interval(c["step_times_s"])
        ratio, lo, hi, r_conf = median_interval([a / b for a, b in zip(c["step_times_s"], c["erm_step_times_s"])])
        confidence = min(confidence, t_conf, r_conf if m != "erm" else 1.0)  # ERM's own ratio is 1 by definition
        rows.append([m, f"{t:.2f} [{t_lo:.2f}, {t_hi:.2f}]", f"{ratio:.2f}× [{lo:.2f}, {hi:.2f}]",
                     f"{c['peak_mb']:.0f}", f"{c['peak_mb'] / erm['peak_mb']:.2f}×"])
    coverage = "95 % intervals" if confidence >= 0.95 else (
        f"intervals min–max, which with {rounds} round{'s' * (rounds > 1)} cover the median only {100 * confidence:.0f} "
        "% of the time (95 % needs 6)")
    same = sorted(r for r, m in cost["runs"].items() if m == "erm" and r != "erm")
    return "\n\n".join([
        "# Table 3: cost per step relative to ERM",
        f"*{cost['machine']}, {cost['threads']} threads. Batches of {cost['sequences']} sequences, the same for every "
        f"method. One ERM process stays loaded; each other method in its own process, {cost['warmup_steps']} warm-up "
        f"steps, then {rounds} rounds in which it and ERM step once each on the round's batch "
        f"({', '.join(map(str, cost['tokens']))} tokens), alternately first; each batch is one the method has not "
        "seen, as in training (VCD generates its student's lines for each). Step time: the median over rounds (ERM's "
        "over all of its steps); × ERM: the median of the rounds' ratios to ERM's step beside it; "
        f"{coverage} (order statistics, distribution-free). Memory: {memory} during one more step, in MB, one "
        "measurement.*",
        markdown(["Method", "Step time (s)", "× ERM", "Peak memory (MB)", "× ERM"], rows),
        f"*{', '.join(same)} train ERM on other data: per batch they cost what ERM costs.*" if same else "",
    ]).rstrip() + "\n"


def selection_table(selected: dict[str, Sequence[dict[str, Any]]], draws: int, rule: str, part: str | None) -> str:
    """Which hyperparameter draw each run selected for each training seed under `rule`, with the draw's values
    and its validation figures there (`part` of each validation record, None: the record itself; the results of
    iga.experiment.sweep.select and its SELECTIONS, in Table 1's order)."""
    val = lambda r: r["validation"] if part is None else r["validation"][part]  # noqa: E731
    rows = [[name, str(r["seed"]), str(r["draw"]), ", ".join(f"{k} {v:.4g}" for k, v in r["hparams"].items()) or "–",
             f"{100 * val(r)['accuracy']:.1f}", f"{val(r)['nll']:.3f}"]
            for name, results in selected.items() for r in results]
    where = ("training-domain instances" if part is None else
             "held-out-domain instances: DomainBed's oracle rule, which no user has, the bound on what selection can do")
    return "\n\n".join([
        f"## Model selection: {rule}",
        f"*{rule.capitalize()}, as DomainBed selects: {draws} {plural('draw', draws)} per method (draw 0: the "
        "configured hyperparameters; draws 1 and up: random from `experiment.ranges`), each trained with every "
        "seed; for each training seed the draw with the highest accuracy on the validation problems "
        f"({where} of training seeds held out of every run's training) is selected, ties going to the lower "
        "validation NLL, then to the lower draw. The figures above are those of the selected runs, one per "
        "training seed.*",
        markdown(["Run", "Seed", "Draw", "Hyperparameters", "Val. acc. (%)", "Val. NLL"], rows)]) + "\n"
