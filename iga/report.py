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
from iga.io import atomic_file, atomic_write_text

DEPTHS = ("quarter", "half", "three_quarters", "penultimate")  # LCS depths (paper Table 5), iga.evaluate
EXTERNAL = {"gsm8k": "GSM8K", "math_id": "MATH-ID", "math_ood": "MATH-OOD"}
MASK_STATS = ("mask_mean", "mask_frac_below_half", "vhat_mean")
DASH = "–"
LEGEND = ("*Δ-Gap = ID − OOD accuracy, lower is better. LCS (Logical Consistency Score) at the penultimate "
          "layer: trace of the covariance of an isomer group's hidden states, lower = more consistent; "
          "normalised = on L2-normalised states. Accuracies in %; with several seeds, mean ± sample std.*")

EVAL_KEYS = ("id_accuracy", "ood_accuracy", "delta_gap", "domain_accuracy",
             *(f"lcs.{depth}.{field}" for depth in DEPTHS for field in ("layer", "raw", "normalized")))
TRAIN_KEYS = ("loss_first_quarter", "loss_last_quarter", "step_time_s_median")
HISTORY_KEYS = ("step", "loss")

# (header, value from the eval metrics, decimals); LCS at the penultimate depth, as in the paper.
TABLE1_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], float], int], ...] = (
    ("ID acc.", lambda e: 100 * e["id_accuracy"], 1),
    ("OOD acc.", lambda e: 100 * e["ood_accuracy"], 1),
    ("Δ-Gap", lambda e: 100 * e["delta_gap"], 1),
    ("LCS (normalised)", lambda e: e["lcs"]["penultimate"]["normalized"], 3),
    ("LCS (raw)", lambda e: e["lcs"]["penultimate"]["raw"], 2),
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


def table1(runs: list[RunResult]) -> str:
    """The paper's Table 1 in Markdown, one row per method, and a one-line legend below it."""
    _check(runs)
    return _table1(_by_method(runs))


def write_report(out_dir: Path, runs: list[RunResult], *, title: str = "IGA lifecycle report",
                 notes: Sequence[str] = ()) -> list[Path]:
    """Write the figures and then `summary.md` into `out_dir`; return the files written, summary last."""
    _check(runs)
    groups = _by_method(runs)
    out_dir = Path(out_dir)
    written: list[Path] = []
    for name, (_, draw) in FIGURES.items():
        path = out_dir / name
        fig = draw(groups)
        if fig is None:
            path.unlink(missing_ok=True)  # a stale one from an earlier report would pass for current
            continue
        _save(fig, path)
        written.append(path)
    summary = out_dir / "summary.md"
    atomic_write_text(summary, _summary(title, groups, notes, {p.name for p in written}))
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
                if not _has(data, key):
                    raise DataError(f"{where}: {part} metrics lack '{key}'")
        for i, row in enumerate(run.history):
            for key in HISTORY_KEYS:
                if key not in row:
                    raise DataError(f"{where}: history row {i} lacks '{key}'")


def _has(data: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _by_method(runs: Iterable[RunResult]) -> Groups:
    groups: Groups = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return groups


# --- tables --------------------------------------------------------------------------------------

def _table1(groups: Groups) -> str:
    externals = _external_names(groups)
    several = any(len(runs) > 1 for runs in groups.values())
    header = ["Method", *(["Seeds"] if several else []), *(name for name, _, _ in TABLE1_COLUMNS),
              *(EXTERNAL.get(b, b) for b in externals)]
    rows = [[method, *([str(len(runs))] if several else []),
             *(_cell([get(r.eval) for r in runs], decimals) for _, get, decimals in TABLE1_COLUMNS),
             *(_cell([100 * a for a in _external_accuracies(runs, b)], 1) for b in externals)]
            for method, runs in groups.items()]
    return _markdown(header, rows) + "\n\n" + LEGEND


def _external_names(groups: Groups) -> list[str]:
    """Benchmarks any run has: the known ones in the paper's order, then any other in order of appearance."""
    present = dict.fromkeys(b for runs in groups.values() for r in runs for b in r.eval.get("external", {}))
    return [b for b in EXTERNAL if b in present] + [b for b in present if b not in EXTERNAL]


def _external_accuracies(runs: list[RunResult], benchmark: str) -> list[float]:
    return [r.eval["external"][benchmark]["accuracy"] for r in runs if benchmark in r.eval.get("external", {})]


def _domain_table(groups: Groups) -> str:
    domains = _domains(groups)
    rows = [[method, *(_cell([100 * r.eval["domain_accuracy"][d] for r in runs if d in r.eval["domain_accuracy"]], 1)
                       for d in domains)] for method, runs in groups.items()]
    return _markdown(["Method", *domains], rows)


def _train_table(groups: Groups) -> str:
    # The mask column only when some run is an IGA one; ERM rows then show a dash.
    with_mask = any("mask_mean_avg" in r.train for runs in groups.values() for r in runs)
    columns = [c for c in TRAIN_COLUMNS if with_mask or c[1] != "mask_mean_avg"]
    rows = [[method, *(_cell([r.train[key] for r in runs if key in r.train], decimals) for _, key, decimals in columns)]
            for method, runs in groups.items()]
    return _markdown(["Method", *(name for name, _, _ in columns)], rows)


def _cell(values: list[float], decimals: int) -> str:
    """`mean ± sample std` over seeds, the bare value for one, a dash for none."""
    if not values:
        return DASH
    mean = f"{statistics.fmean(values):.{decimals}f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{decimals}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    align = [":---", *["---:"] * (len(header) - 1)]  # names left, numbers right
    return "\n".join("| " + " | ".join(line) + " |" for line in (header, align, *rows))


def _domains(groups: Groups) -> list[str]:
    """Domain names in order of first appearance: they vary with the configuration."""
    return list(dict.fromkeys(d for runs in groups.values() for r in runs for d in r.eval["domain_accuracy"]))


# --- summary.md ----------------------------------------------------------------------------------

def _summary(title: str, groups: Groups, notes: Sequence[str], images: set[str]) -> str:
    """Notes first (they are caveats to read before the numbers), each figure after its table."""
    def figures(*names: str) -> list[str]:
        return [f"![{FIGURES[n][0]}]({n})" for n in names if n in images]

    parts = [f"# {title}",
             *(["\n".join(f"- {note}" for note in notes)] if notes else []),
             "## Results", _table1(groups), *figures("accuracy.png", "lcs_layers.png"),
             "## Accuracy per domain", _domain_table(groups), *figures("domain_accuracy.png"),
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; std is NaN (no error bar drawn) for one value, mean NaN (no bar) for none."""
    nan = float("nan")
    if not values:
        return nan, nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else nan)


def _grouped_bars(ax: Any, labels: list[str], series: dict[str, tuple[list[list[float]], str]]) -> None:
    """Bars for each label, one per series (name -> per-label values over seeds, colour), ±std bars."""
    width = 0.8 / len(series)
    for k, (name, (values, color)) in enumerate(series.items()):
        means, stds = zip(*(_mean_std(v) for v in values))
        x = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(x, means, width, yerr=stds, capsize=3, color=color, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize="small")


def _accuracy_figure(groups: Groups) -> Any:
    # Greys, not the method colours: here colour means ID vs OOD, and methods are on the x axis.
    fig = _figure(figsize=(max(4.0, 1.3 * len(groups) + 1.5), 3.6))
    ax = fig.subplots()
    _grouped_bars(ax, list(groups), {
        "ID": ([[100 * r.eval["id_accuracy"] for r in runs] for runs in groups.values()], "0.3"),
        "OOD": ([[100 * r.eval["ood_accuracy"] for r in runs] for runs in groups.values()], "0.7")})
    ax.set_title("ID vs OOD accuracy")
    return fig


def _domain_figure(groups: Groups) -> Any:
    domains, colors = _domains(groups), _colors(groups)
    fig = _figure(figsize=(max(5.0, 0.5 * len(domains) * len(groups) + 2), 3.6))
    ax = fig.subplots()
    _grouped_bars(ax, domains, {
        method: ([[100 * r.eval["domain_accuracy"][d] for r in runs if d in r.eval["domain_accuracy"]]
                  for d in domains], colors[method]) for method, runs in groups.items()})
    ax.set_title("Accuracy per domain")
    return fig


def _lcs_figure(groups: Groups) -> Any:
    fig = _figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    for method, color in _colors(groups).items():
        means = [statistics.fmean(r.eval["lcs"][d]["normalized"] for r in groups[method]) for d in DEPTHS]
        ax.plot(range(len(DEPTHS)), means, marker="o", color=color, label=method)
    ax.set_xticks(range(len(DEPTHS)), [_depth_label(groups, d) for d in DEPTHS])
    ax.set_ylabel("LCS (normalised)")
    ax.set_title("Normalised LCS by depth (lower = more consistent)")
    ax.legend(fontsize="small")
    return fig


def _depth_label(groups: Groups, depth: str) -> str:
    # Runs on different base models can put a depth at different layers: name them all.
    layers = sorted({r.eval["lcs"][depth]["layer"] for runs in groups.values() for r in runs})
    return f"{depth.replace('_', ' ')}\n(layer {'/'.join(map(str, layers))})"


def _loss_figure(groups: Groups) -> Any:
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


def _mask_figure(groups: Groups) -> Any | None:
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
FIGURES: dict[str, tuple[str, Callable[[Groups], Any]]] = {
    "accuracy.png": ("ID vs OOD accuracy per method", _accuracy_figure),
    "lcs_layers.png": ("Normalised LCS by depth", _lcs_figure),
    "domain_accuracy.png": ("Accuracy per domain", _domain_figure),
    "loss.png": ("Training loss", _loss_figure),
    "mask.png": ("IGA mask statistics", _mask_figure),
}
