"""Tables 1–3 from the pairs' outputs (experiments/runs/) and Table 3's costs (experiments/cost.json), with
Table 1's draws selected by training-domain validation and, apart, by test-domain validation; logged to the
experiment's parent MLflow run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from iga.errors import DataError
from iga.eval.scores import summarize
from iga.experiment import pairs
from iga.experiment.sweep import SELECTIONS, matrix, select, validation_of
from iga.io import atomic_write_text, read_jsonl
from iga.params import Params
from iga.report.comparable import check_comparable
from iga.report.report import RunResult, write_report
from iga.report.tables import partial_note, plural, selection_table, shown, table1, table2, table3
from tasks import tracking
from tasks.paths import COST, EXPERIMENT_REPORT, PAIRS, TABLES, pair_outputs


@task(cache_policy=NO_CACHE)
def load_results(params: Params) -> tuple[list[dict[str, Any]], list[str]]:
    """The pairs of the matrix that have run, each its metrics with `evaluation` (its scores and LCS groups), and
    the stages of those that have not, after checking that dvc.yaml's pairs (experiments/pairs.yaml) are those
    params.yaml asks for."""
    pairs.check(params, yaml.safe_load(PAIRS.read_text())["pairs"] if PAIRS.is_file() else None, str(PAIRS))
    results, not_run = [], []
    for pair in matrix(params):
        paths = pair_outputs(*pair)
        if not paths["metrics"].is_file():
            not_run.append(pair.stage)
            continue
        results.append(json.loads(paths["metrics"].read_text())
                       | {"evaluation": {"scores": read_jsonl(paths["scores"]), "lcs": read_jsonl(paths["lcs"])}})
    if not results:
        raise DataError(f"no pair of the matrix has run ({len(not_run)} to go): `dvc repro tables` runs them")
    return results, not_run


@task(cache_policy=NO_CACHE)
def write_tables(params: Params, results: list[dict[str, Any]], not_run: list[str]) -> list[Path]:
    """reports/table1.md, table2.md, table3.md and reports/experiment/ (Table 1's runs, figures), every
    figure with its interval over training seeds and test seeds. Table 1: each run's selected draw per
    training seed (iga.experiment.sweep.select), under each of the two selection rules; Table 2: every run at
    draw 0, IGA's included. Before every pair has run (`not_run`), each table shows the training seeds its runs
    have finished and says so (iga.report.tables.shown). Refused when the pairs ran under different train
    precisions or evaluation dtypes."""
    ex = params.experiment
    check_comparable({f"{r['run']}/draw{r['draw']}/seed{r['seed']}": r["ran"] for r in results}, "the experiment's "
                     "tables")
    expected, present = matrix(params), {(r["run"], r["draw"], r["seed"]) for r in results}
    first = [*ex.table1, *([ex.oracle] if ex.oracle else [])]  # Table 1's runs and its reference
    second = ["iga", *ex.table2]
    seeds1, out1 = shown(expected, present, first, ["iga", "erm"], "Table 1")
    seeds2, out2 = shown([p for p in expected if p.draw == 0], present, second, ["iga"], "Table 2")
    first, second = [n for n in first if n not in out1], [n for n in second if n not in out2]
    selected = {rule: select((r for r in results if r["run"] in first), rule) for rule in SELECTIONS}
    tables = {rule: {name: [chosen[(name, seed)] for seed in seeds1] for name in first}  # Table 1 under each rule
              for rule, chosen in selected.items()}
    at_draw0 = {(r["run"], r["seed"]): r for r in results if r["draw"] == 0}
    tables[2] = {name: [at_draw0[(name, seed)] for seed in seeds2] for name in second}
    partial = {1: partial_note(not_run, len(expected), seeds1, out1),
               2: partial_note(not_run, len(expected), seeds2, out2)}
    evaluations = {n: {name: [r["evaluation"] for r in rows] for name, rows in t.items()} for n, t in tables.items()}
    summaries = {n: {name: summarize(evaluations[n][name], rows[0]["lcs_layers"]) for name, rows in t.items()}
                 for n, t in tables.items()}
    ran = results[0]["ran"]

    def scale(seeds: list[int]) -> str:
        return (f"{ex.steps} steps x {params.train.groups_per_batch * len(params.domains.train)} sequences per run, "
                f"{len(seeds)} {plural('training seed', len(seeds))} ({', '.join(map(str, seeds))}); NLL and "
                f"LCS on every test seed ({summaries[2]['iga']['nll_n_seeds']}), accuracy on the first "
                f"{ex.eval_groups} ({ex.eval_groups * len(params.domains.train)} ID / "
                f"{ex.eval_groups * len(params.domains.ood)} OOD problems), max_new_tokens {ex.max_new_tokens}, "
                f"student {params.student.base}, trained in {ran['train_precision']}, evaluated in {ran['eval_dtype']}")

    run_s: dict[str, float] = {}  # training + evaluation of every run, by the machine that ran it
    for r in results:
        run_s[r["ran"]["device"]] = run_s.get(r["ran"]["device"], 0.0) + r["train"]["train_s"] + r["train"]["eval_s"]
    selection = {rule: f"model selection: {rule}, {ex.hparam_draws} {plural('draw', ex.hparam_draws)} per method "
                       "(draw 0: the configured "
                       f"hyperparameters); for each training seed the draw with the best accuracy on "
                       f"{validation_of(tables[rule][first[0]][0], rule)['n']} "
                       f"{'training' if part is None else 'held-out'}-domain problems of {ex.val_seeds} training "
                       "seeds held out of every run's training" for rule, part in SELECTIONS.items()}
    reported = next(iter(SELECTIONS))  # training-domain validation: the report's runs
    runs = [RunResult(r["run"], r["seed"], r["eval"], r["train"], r["history"]) for rows in tables[reported].values()
            for r in rows]
    written = write_report(EXPERIMENT_REPORT, runs, summaries=summaries[reported], evaluations=evaluations[reported],
                           title="Experiment: Table 1's runs",
                           notes=[*filter(None, [partial[1]]), scale(seeds1), selection[reported]])
    oracle = ex.oracle if ex.oracle in first else None
    parts = [table1(summaries[rule], evaluations[rule], "iga", f"{scale(seeds1)}; {selection[rule]}", run_s, oracle,
                    rule, partial[1])
             + "\n" + selection_table(tables[rule], ex.hparam_draws, rule, part) for rule, part in SELECTIONS.items()]
    texts = {1: "\n".join(parts),
             2: table2(summaries[2], evaluations[2], ex.runs, "iga", f"{scale(seeds2)}; every run at the configured "
                       "hyperparameters (draw 0), IGA's included: an ablation changes one thing", partial[2]),
             3: table3(json.loads(COST.read_text()))}
    for n, text in texts.items():
        atomic_write_text(TABLES[n], text)
    mlflow = tracking.mlflow_module()
    parent = tracking.experiment_parent()
    for path in [*TABLES.values(), *written]:
        mlflow.MlflowClient().log_artifact(parent, str(path), "report")
    return [*TABLES.values(), *written]
