"""The lifecycle's human-readable report: the paper's Table 1 in Markdown, more tables, and figures.

Pure: it takes one `RunResult` per trained (method, seed) and writes `summary.md` and PNGs. matplotlib
is imported only when drawing (its import costs about a second). Each figure is a bare `Figure` on its
own Agg canvas rather than a pyplot figure: nothing enters pyplot's global figure list (so nothing can
leak) and the caller's backend is never switched (`matplotlib.use` would close a notebook's figures).
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from iga.errors import DataError
from iga.eval.scores import DEPTHS, Evaluation, compare, detectable
from iga.io import atomic_file, atomic_write_text

EXTERNAL = {"gsm8k": "GSM8K", "math_id": "MATH-ID", "math_ood": "MATH-OOD"}
MASK_STATS = ("mask_mean", "mask_frac_below_half", "vhat_mean")
DASH = "–"
LEGEND = ("*Each figure with its 95 % interval [lo, hi]: percentile bootstrap over test seeds (and over training "
          "seeds when there are several), iga/stats.py. Accuracies and Δ-Gap in %. Δ-Gap = ID − OOD accuracy and "
          "NLL gap = OOD − ID NLL, each within a test seed, then averaged: positive = worse out of domain; a negative "
          "gap is not better than zero (|gap| ranks methods). NLL = mean per-token negative log-likelihood of the "
          "gold CoT + answer (nats). LCS (Logical Consistency Score) at the penultimate layer: trace of the "
          "covariance of an isomer group's hidden states, lower = more consistent; normalised = on L2-normalised "
          "states. Follows hint = of the problems that carry a planted hint, the % answered as the hint says (in "
          "domain it is right at teacher.cue_reliability, out of domain always wrong): lower = less cue reliance.*")

EVAL_KEYS = ("id_accuracy", "ood_accuracy", "delta_gap", "domain_accuracy", "ci",
             *(f"lcs.{depth}.{field}" for depth in DEPTHS for field in ("layer", "raw", "normalized")))
TRAIN_KEYS = ("loss_first_quarter", "loss_last_quarter", "step_time_s_median")
HISTORY_KEYS = ("step", "loss")

# (header, figure name in the metrics and their `ci`, display scale, decimals); LCS at the penultimate depth. The raw
# LCS, a trace in the thousands, in whole units: its tenths move with the CPU's summation order (docs/measured.md).
TABLE1_COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("ID acc.", "id_accuracy", 100, 1),
    ("OOD acc.", "ood_accuracy", 100, 1),
    ("Δ-Gap", "delta_gap", 100, 1),
    ("NLL ID", "nll_id", 1, 3),
    ("NLL OOD", "nll_ood", 1, 3),
    ("NLL gap", "nll_gap", 1, 3),
    ("LCS (normalised)", "lcs.penultimate.normalized", 1, 3),
    ("LCS (raw)", "lcs.penultimate.raw", 1, 0),
    ("Follows hint ID", "hint_id", 100, 1),
    ("Follows hint OOD", "hint_ood", 100, 1),
)
# (header, train-metrics key, decimals)
TRAIN_COLUMNS = (("Loss (first ¼)", "loss_first_quarter", 3), ("Loss (last ¼)", "loss_last_quarter", 3),
                 ("Step time (s, median)", "step_time_s_median", 2), ("Mask mean (avg)", "mask_mean_avg", 3))


@dataclass(frozen=True)
class RunResult:
    """One trained (method, seed): its eval and train metrics and its per-step training history."""
    method: str
    seed: int
    eval: dict[str, Any]
    train: dict[str, Any]
    history: list[dict[str, Any]]


Groups = dict[str, list[RunResult]]  # method -> its runs, methods in order of first appearance
Summaries = dict[str, dict[str, Any]]  # method -> its figures over all its runs, with `ci` (iga.eval.scores.summarize)


def table1(runs: list[RunResult], summaries: Summaries | None = None) -> str:
    """The paper's Table 1 in Markdown, one row per method with 95 % intervals, and a legend below it."""
    groups = _by_method(runs)
    return results_table(_summaries(groups, summaries))


def write_report(out_dir: Path, runs: list[RunResult], *, summaries: Summaries | None = None,
                 evaluations: dict[str, list[Evaluation]] | None = None, title: str = "IGA lifecycle report",
                 notes: Sequence[str] = ()) -> list[Path]:
    """Write the figures and then `summary.md` into `out_dir`; return the files written, summary last.

    `summaries` are each method's figures over all its runs; without them every method must have one
    run, whose own evaluation (with its intervals) is the summary. With `evaluations` (each method's
    per-problem scores, one per training seed) the report adds every method's paired difference from
    the first method and the smallest difference this evaluation can detect."""
    groups = _by_method(runs)
    summ = _summaries(groups, summaries)
    out_dir = Path(out_dir)
    written: list[Path] = []
    for name, (_, draw) in FIGURES.items():
        path = out_dir / name
        fig = draw(groups, summ)
        if fig is None:
            path.unlink(missing_ok=True)  # a stale one from an earlier report would pass for current
            continue
        _save(fig, path)
        written.append(path)
    summary = out_dir / "summary.md"
    paired = paired_sections(evaluations) if evaluations and len(evaluations) > 1 else []
    atomic_write_text(summary, _summary(title, groups, summ, notes, {p.name for p in written}, paired))
    return [*written, summary]


# --- validation and grouping ---------------------------------------------------------------------

def _check(runs: list[RunResult]) -> None:
    """Fail with a message naming the run and key, rather than a KeyError half-way through drawing."""
    if not runs:
        raise DataError("no runs to report: train and evaluate at least one method first")
    seen = set()
    for run in runs:
        where = f"{run.method} seed {run.seed}"
        if (run.method, run.seed) in seen:
            raise DataError(f"{where}: given twice; each (method, seed) must appear once")
        seen.add((run.method, run.seed))
        for part, data, keys in (("eval", run.eval, EVAL_KEYS), ("train", run.train, TRAIN_KEYS)):
            for key in keys:
                if _get(data, key) is None:
                    raise DataError(f"{where}: {part} metrics lack '{key}'")
        for i, row in enumerate(run.history):
            for key in HISTORY_KEYS:
                if key not in row:
                    raise DataError(f"{where}: history row {i} lacks '{key}'")


def _get(data: Any, dotted: str) -> Any:
    """`data["a"]["b"]` for "a.b"; None when any part is missing."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _by_method(runs: Iterable[RunResult]) -> Groups:
    runs = list(runs)
    _check(runs)
    groups: Groups = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return groups


def _summaries(groups: Groups, summaries: Summaries | None) -> Summaries:
    if summaries is not None:
        missing = [m for m in groups if m not in summaries]
        if missing:
            raise DataError(f"no summary for method(s) {missing}")
        return {m: summaries[m] for m in groups}
    several = [m for m, runs in groups.items() if len(runs) > 1]
    if several:
        raise DataError(f"{several}: several seeds per method need their combined summaries (iga.eval.scores.summarize)")
    return {m: runs[0].eval for m, runs in groups.items()}


# --- tables --------------------------------------------------------------------------------------

def figure_cell(summary: dict[str, Any], name: str, scale: float = 1.0, decimals: int = 1) -> str:
    """`value [lo, hi]`: the figure and its 95 % interval; the bare value without one, a dash without either."""
    value = _get(summary, name)
    if value is None:
        return DASH
    ci = summary.get("ci", {}).get(name)
    cell = f"{scale * value:.{decimals}f}"
    return cell if ci is None else f"{cell} [{scale * ci[0]:.{decimals}f}, {scale * ci[1]:.{decimals}f}]"


def results_table(summaries: Summaries) -> str:
    externals = _external_names(summaries)
    # the hint columns only where problems carry hints (teacher.shortcut_rate > 0)
    columns = [c for c in TABLE1_COLUMNS if not c[1].startswith("hint_") or any(c[1] in s for s in summaries.values())]
    header = ["Method", "n", *(name for name, _, _, _ in columns), *(EXTERNAL.get(b, b) for b in externals)]
    rows = [[method, _sizes(s), *(figure_cell(s, key, scale, d) for _, key, scale, d in columns),
             *(figure_cell(s, f"external.{b}.accuracy", 100, 1) for b in externals)]
            for method, s in summaries.items()]
    return markdown(header, rows) + "\n\n" + LEGEND


def _sizes(summary: dict[str, Any]) -> str:
    """What a row rests on: test seeds, ID / OOD problems, training seeds."""
    seeds = summary.get("n_seeds")
    text = f"{summary['n_id']}/{summary['n_ood']}" + (f" of {seeds} seeds" if seeds else "")
    train = summary.get("n_train_seeds", 1)
    return text + (f", {train} runs" if train > 1 else "")


def _external_names(summaries: Summaries) -> list[str]:
    """Benchmarks any run has: the known ones in the paper's order, then any other in order of appearance."""
    present = dict.fromkeys(b for s in summaries.values() for b in s.get("external", {}))
    return [b for b in EXTERNAL if b in present] + [b for b in present if b not in EXTERNAL]


def _domain_table(summaries: Summaries, field: str, scale: float, decimals: int) -> str:
    domains = _domains(summaries, field)
    rows = [[method, *(figure_cell(s, f"{field}.{d}", scale, decimals) for d in domains)]
            for method, s in summaries.items()]
    return markdown(["Method", *domains], rows)


def _train_table(groups: Groups) -> str:
    # The mask column only when some run is an IGA one; ERM rows then show a dash.
    with_mask = any("mask_mean_avg" in r.train for runs in groups.values() for r in runs)
    columns = [c for c in TRAIN_COLUMNS if with_mask or c[1] != "mask_mean_avg"]
    rows = [[method, *(_mean_cell([r.train[key] for r in runs if key in r.train], decimals)
                       for _, key, decimals in columns)] for method, runs in groups.items()]
    return markdown(["Method", *(name for name, _, _ in columns)], rows)


def _mean_cell(values: list[float], decimals: int) -> str:
    """Training figures (no held-out interval): `mean ± sample std` over seeds, the bare value for one."""
    if not values:
        return DASH
    mean = f"{statistics.fmean(values):.{decimals}f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{decimals}f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    align = [":---", *["---:"] * (len(header) - 1)]  # names left, numbers right
    return "\n".join("| " + " | ".join(line) + " |" for line in (header, align, *rows))


def _domains(summaries: Summaries, field: str = "domain_accuracy") -> list[str]:
    """Domain names in order of first appearance: they vary with the configuration."""
    return list(dict.fromkeys(d for s in summaries.values() for d in s.get(field, {})))


# (header, figure, display scale, decimals, unit) of the paired comparisons; the gaps compare by size |gap|
PAIRED: tuple[tuple[str, str, float, int, str], ...] = (
    ("ID acc.", "id_accuracy", 100, 1, " pp"), ("OOD acc.", "ood_accuracy", 100, 1, " pp"),
    ("|Δ-Gap|", "delta_gap", 100, 1, " pp"), ("NLL ID", "nll_id", 1, 3, ""), ("NLL OOD", "nll_ood", 1, 3, ""),
    ("|NLL gap|", "nll_gap", 1, 3, ""))


def detectable_or_none(a: Sequence[Evaluation], b: Sequence[Evaluation], figure: str) -> tuple[float, int] | None:
    """The pair's minimum detectable difference and its number of test seeds (iga.eval.scores.detectable);
    None where no difference is detectable (too few test seeds for the test at α 0.05) or nothing pairs
    (an instance-level split scores other problems)."""
    try:
        return detectable(a, b, figure)
    except DataError:
        return None


def paired_sections(evaluations: dict[str, list[Evaluation]]) -> list[str]:
    """Each method against the first, paired problem by problem, and what this evaluation can detect."""
    reference, *others = evaluations
    rows, detect = [], []
    for method in others:
        cells = []
        for _, figure, scale, decimals, unit in PAIRED:
            c = compare(evaluations[method], evaluations[reference], figure)
            f = lambda v: f"{scale * v:+.{decimals}f}"  # noqa: E731
            cells.append(f"{f(c.delta)} [{f(c.lo)}, {f(c.hi)}], p {c.p:.2g}")
        rows.append([f"{method} − {reference}", *cells])
        mdes = [detectable_or_none(evaluations[method], evaluations[reference], figure) for _, figure, *_ in PAIRED]
        seeds = next((str(n) for _, n in filter(None, mdes)), "too few")
        detect.append([f"{method} vs {reference}", seeds,
                       *(f"{scale * found[0]:.{d}f}{u}" if found else "none"
                         for found, (_, _, scale, d, u) in zip(mdes, PAIRED))])
    return ["## Paired differences",
            "*Difference between two methods on the same problems (test seeds for the gaps), with its 95 % interval "
            "(paired bootstrap over test seeds) and its two-sided p-value (sign-flip test over test seeds: a seed's "
            "isomers are one unit, not independent problems). NLL in nats per token; the gaps compare by size.*", markdown(["Pair", *(h for h, *_ in PAIRED)], rows),
            "## What this evaluation can detect",
            "*The smallest true difference between two methods that the test above (two-sided, α = 0.05) detects "
            "with 80 % power at this evaluation's size, simulated from the pair's per-test-seed differences; "
            "an accuracy gains whole problems, so a test seed with m problems moves by 100/m points at a time "
            "(iga.stats.detectable_difference).*",
            markdown(["Pair", "test seeds", *(h for h, *_ in PAIRED)], detect)]


# --- summary.md ----------------------------------------------------------------------------------

def _summary(title: str, groups: Groups, summaries: Summaries, notes: Sequence[str], images: set[str],
             paired: Sequence[str] = ()) -> str:
    """Notes first (they are caveats to read before the numbers), each figure after its table."""
    def figures(*names: str) -> list[str]:
        return [f"![{FIGURES[n][0]}]({n})" for n in names if n in images]

    with_nll = any("domain_nll" in s for s in summaries.values())
    parts = [f"# {title}",
             *(["\n".join(f"- {note}" for note in notes)] if notes else []),
             "## Results", results_table(summaries), *paired, *figures("accuracy.png", "lcs_layers.png"),
             "## Accuracy per domain (%)", _domain_table(summaries, "domain_accuracy", 100, 1),
             *figures("domain_accuracy.png"),
             *(["## NLL per domain (nats per token)", _domain_table(summaries, "domain_nll", 1, 3)] if with_nll else []),
             "## Training", _train_table(groups), *figures("loss.png", "mask.png")]
    return "\n\n".join(parts) + "\n"


# --- figures -------------------------------------------------------------------------------------

def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure drawn by Agg, outside pyplot (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    # No Software entry: PNG bytes then depend on the drawing only, not on the matplotlib version.
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110, metadata={"Software": None})


def _colors(groups: Groups) -> dict[str, str]:
    """One colour per method, the same in every figure."""
    return {method: f"C{i % 10}" for i, method in enumerate(groups)}


def _grouped_bars(ax: Any, labels: list[str], series: dict[str, tuple[list[tuple[float, list[float] | None]], str]]
                  ) -> None:
    """Bars for each label, one per series (name -> per-label (value, [lo, hi] or None), colour), with the
    intervals as error bars (a missing value draws no bar)."""
    width = 0.8 / len(series)
    nan = float("nan")
    for k, (name, (cells, color)) in enumerate(series.items()):
        values = [v if v is not None else nan for v, _ in cells]
        err = [[v - ci[0] if ci else 0 for v, ci in zip(values, (c for _, c in cells))],
               [ci[1] - v if ci else 0 for v, ci in zip(values, (c for _, c in cells))]]
        x = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(x, values, width, yerr=err, capsize=3, color=color, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize="small")


def _pct(summary: dict[str, Any], name: str) -> tuple[float | None, list[float] | None]:
    value, ci = _get(summary, name), summary.get("ci", {}).get(name)
    return (None if value is None else 100 * value), (None if ci is None else [100 * c for c in ci])


def _accuracy_figure(groups: Groups, summaries: Summaries) -> Any:
    # Greys, not the method colours: here colour means ID vs OOD, and methods are on the x axis.
    fig = _figure(figsize=(max(4.0, 1.3 * len(summaries) + 1.5), 3.6))
    ax = fig.subplots()
    _grouped_bars(ax, list(summaries), {
        "ID": ([_pct(s, "id_accuracy") for s in summaries.values()], "0.3"),
        "OOD": ([_pct(s, "ood_accuracy") for s in summaries.values()], "0.7")})
    ax.set_title("ID vs OOD accuracy (95 % intervals)")
    return fig


def _domain_figure(groups: Groups, summaries: Summaries) -> Any:
    domains, colors = _domains(summaries), _colors(groups)
    fig = _figure(figsize=(max(5.0, 0.5 * len(domains) * len(summaries) + 2), 3.6))
    ax = fig.subplots()
    _grouped_bars(ax, domains, {method: ([_pct(s, f"domain_accuracy.{d}") for d in domains], colors[method])
                                for method, s in summaries.items()})
    ax.set_title("Accuracy per domain (95 % intervals)")
    return fig


def _lcs_figure(groups: Groups, summaries: Summaries) -> Any:
    fig = _figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    for method, color in _colors(groups).items():
        s = summaries[method]
        names = [f"lcs.{d}.normalized" for d in DEPTHS]
        values = [_get(s, n) for n in names]
        cis = [s.get("ci", {}).get(n) or [v, v] for n, v in zip(names, values)]
        ax.errorbar(range(len(DEPTHS)), values, yerr=[[v - c[0] for v, c in zip(values, cis)],
                                                      [c[1] - v for v, c in zip(values, cis)]],
                    marker="o", capsize=3, color=color, label=method)
    ax.set_xticks(range(len(DEPTHS)), [_depth_label(groups, d) for d in DEPTHS])
    ax.set_ylabel("LCS (normalised)")
    ax.set_title("Normalised LCS by depth (lower = more consistent)")
    ax.legend(fontsize="small")
    return fig


def _depth_label(groups: Groups, depth: str) -> str:
    # Runs on different base models can put a depth at different layers: name them all.
    layers = sorted({r.eval["lcs"][depth]["layer"] for runs in groups.values() for r in runs})
    return f"{depth.replace('_', ' ')}\n(layer {'/'.join(map(str, layers))})"


def _loss_figure(groups: Groups, summaries: Summaries) -> Any:
    fig = _figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    for method, color in _colors(groups).items():
        steps, losses = _mean_curve(groups[method], "loss")
        ax.plot(steps, losses, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, _moving_average(losses, max(1, len(losses) // 8)), color=color, linewidth=1.8, label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss (faint: per step; bold: moving average)")
    ax.legend(fontsize="small")
    return fig


def _mask_figure(groups: Groups, summaries: Summaries) -> Any | None:
    """IGA's mask statistics over steps, or None when no run logged them (ERM-only reports)."""
    colors = _colors(groups)
    masked = [m for m, runs in groups.items() if any("mask_mean" in row for r in runs for row in r.history)]
    if not masked:
        return None
    fig = _figure(figsize=(11.0, 3.4))
    for ax, key in zip(fig.subplots(1, len(MASK_STATS)), MASK_STATS):
        for method in masked:
            ax.plot(*_mean_curve(groups[method], key), color=colors[method], label=method)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.axes[0].legend(fontsize="small")
    return fig


def _mean_curve(runs: list[RunResult], key: str) -> tuple[list[int], list[float]]:
    """`key` per step, averaged over the seeds that logged it at that step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for row in run.history:
            if key in row:
                by_step[row["step"]].append(row[key])
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points, so the curve starts at the first step."""
    sums = [0.0, *accumulate(values)]
    starts = [max(0, i + 1 - window) for i in range(len(values))]
    return [(sums[i + 1] - sums[s]) / (i + 1 - s) for i, s in enumerate(starts)]


# name -> (caption, draw); draw returns None to skip the file. Also the order the files are written in.
FIGURES: dict[str, tuple[str, Callable[[Groups, Summaries], Any]]] = {
    "accuracy.png": ("ID vs OOD accuracy per method", _accuracy_figure),
    "lcs_layers.png": ("Normalised LCS by depth", _lcs_figure),
    "domain_accuracy.png": ("Accuracy per domain", _domain_figure),
    "loss.png": ("Training loss", _loss_figure),
    "mask.png": ("IGA mask statistics", _mask_figure),
}
