"""The pipeline's public files (docs/stages.md, "Outputs"); dvc.yaml declares the same paths."""
from pathlib import Path

SEEDS = Path("data/seeds/seeds.jsonl")
DAGS = Path("data/isomers/dags.jsonl")
INSTANCES = Path("data/isomers/instances.jsonl")
ISOMERS_LEDGER = Path("data/isomers/ledger.jsonl")  # one row per teacher call: tokens, cost, cache hit
GATE_LEDGER = Path("data/gate/ledger.jsonl")
TEACHER_METRICS = Path("metrics/teacher.json")  # both ledgers' totals
ACCEPTED = Path("data/gate/accepted.jsonl")
REJECTS = Path("data/gate/rejects.jsonl")
REGENERATED = Path("data/gate/regenerated.jsonl")
GATE_DAGS = Path("data/gate/dags.jsonl")  # every seed's DAG as the gate used it (regenerated extractions included)
GATE_DOCS = Path("data/gate/docs")
TRAIN = Path("data/split/train.jsonl")
TEST = Path("data/split/test.jsonl")
OOD = Path("data/split/ood.jsonl")
SELECTED = Path("data/select/train.jsonl")  # the training rows, each with the CoT the select stage kept: training reads it
CANDIDATES = Path("data/select/candidates.jsonl")  # every candidate CoT of every training instance, scored
SELECT_LEDGER = Path("data/select/ledger.jsonl")
SELECT_METRICS = Path("metrics/select.json")
GATE_METRICS = Path("metrics/gate.json")
SPLIT_METRICS = Path("metrics/split.json")
BASE_MODEL = Path("models/base")
STUDENT_METRICS = Path("metrics/student.json")
LIFECYCLE_LOCK = Path(".cache/lifecycle.lock")  # held by a running lifecycle (iga.io.exclusive)
REPORTS = Path("reports")  # summary.md and its plots, written by the lifecycle after registration


def adapter_dir(method: str) -> Path:
    return Path("models") / method / "adapter"


def history_file(method: str) -> Path:
    """Per-step training metrics, one JSON object per step."""
    return Path("models") / method / "history.jsonl"


def checkpoint_dir(method: str) -> Path:
    """Outside the DVC outputs on purpose: `dvc repro` deletes outputs before a stage reruns."""
    return Path("models") / method / "checkpoints"


def train_metrics(method: str) -> Path:
    return Path("metrics/train") / f"{method}.json"


def completions_file(method: str) -> Path:
    """Every evaluation completion with its extracted and gold answer, for reading the errors."""
    return Path("models") / method / "completions.jsonl"


def scores_file(method: str) -> Path:
    """Every held-out problem's outcome (`set, id, seed_id, domain, correct, nll, tokens`): two methods
    compare problem by problem."""
    return Path("models") / method / "scores.jsonl"


def eval_metrics(method: str) -> Path:
    return Path("metrics/eval") / f"{method}.json"


def eval_plot(method: str, name: str) -> Path:
    """DVC plot data (`dvc plots show`): accuracy per split, LCS per layer."""
    return Path("plots") / method / f"{name}.json"



EXPERIMENT = Path("experiments")  # the experiment's matrix: pairs.yaml, runs/ (committed), cost.json
PAIRS = EXPERIMENT / "pairs.yaml"  # dvc.yaml's pair stages, generated from params.yaml (iga/experiment/pairs.py)
RUNS = EXPERIMENT / "runs"  # every pair's outputs: what the tables stage reads
COST = EXPERIMENT / "cost.json"  # Table 3's measurements (the cost stage)
TABLES = {n: REPORTS / f"table{n}.md" for n in (1, 2, 3)}
EXPERIMENT_REPORT = REPORTS / "experiment"  # Table 1's runs as summary.md and figures


def selected_outputs(strategy: str | None = None) -> dict[str, Path]:
    """What a select run writes: the demo's `select` stage (None: select.strategy, the data `train` reads), or
    `selected@<strategy>` (the experiment's runs with that `select`, whatever select.strategy says)."""
    if strategy is None:
        return {"train": SELECTED, "candidates": CANDIDATES, "ledger": SELECT_LEDGER, "metrics": SELECT_METRICS}
    folder = SELECTED.parent / strategy
    return {"train": folder / "train.jsonl", "candidates": folder / "candidates.jsonl",
            "ledger": folder / "ledger.jsonl", "metrics": SELECT_METRICS.with_name(f"select-{strategy}.json")}


def pair_inputs(select: str) -> dict[str, Path]:
    """What a pair whose run selects by `select` reads (iga.experiment.pair.PairData.read): the split, the gate's
    accepted rows, and the training rows with the CoTs its selected@ stage kept."""
    return {"train": TRAIN, "test": TEST, "ood": OOD, "accepted": ACCEPTED,
            "training": selected_outputs(select)["train"]}


def pair_outputs(run: str, draw: int, seed: int) -> dict[str, Path]:
    """A finished (run, hyperparameter draw, seed), as its DVC stage declares it (small, committed to git):
    `metrics` (summary, validation, hyperparameters, training, what ran), `scores` (every held-out problem),
    `lcs` (every LCS group)."""
    folder = RUNS / run / f"draw{draw}" / f"seed{seed}"
    return {"metrics": folder / "metrics.json", "scores": folder / "scores.jsonl", "lcs": folder / "lcs.jsonl"}


def pair_checkpoints(key: str) -> Path:
    """Outside the outputs (`dvc repro` deletes those before a stage reruns) and outside git; removed when
    the pair finishes."""
    return EXPERIMENT / "checkpoints" / key


TEACHER_RANKING = REPORTS / "teachers.md"  # `flows.rank_teachers`: named teachers by dataset RSR under the student
RSR_CORRELATION = REPORTS / "rsr_correlation.md"  # `flows.rsr_experiment`: RSR against the students they teach
RSR_RESULTS = EXPERIMENT / "rsr" / "results.json"
