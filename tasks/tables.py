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
from iga.report.tables import selection_table, table1, table2, table3
from tasks import tracking
from tasks.paths import COST, EXPERIMENT_REPORT, PAIRS, TABLES, pair_outputs


@task(cache_policy=NO_CACHE)
def load_results(params: Params) -> list[dict[str, Any]]:
    """Every pair of the matrix: its metrics with `evaluation` (its scores and LCS groups), after checking that
    dvc.yaml's pairs (experiments/pairs.yaml) are those params.yaml asks for."""
    pairs.check(params, yaml.safe_load(PAIRS.read_text())["pairs"] if PAIRS.is_file() else None, str(PAIRS))
    results, missing = [], []
    for pair in matrix(params):
        paths = pair_outputs(*pair)
        if not paths["metrics"].is_file():
            missing.append(pair.stage)
            continue
        results.append(json.loads(paths["metrics"].read_text())
                       | {"evaluation": {"scores": read_jsonl(paths["scores"]), "lcs": read_jsonl(paths["lcs"])}})
    if missing:
        raise DataError(f"{len(missing)} pairs have no outputs ({', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''}): run `dvc repro tables`")
    return results


@task(cache_policy=NO_CACHE)
def write_tables(params: Params, results: list[dict[str, Any]]) -> list[Path]:
    """reports/table1.md, table2.md, table3.md and reports/experiment/ (Table 1's runs, figures), every
    figure with its interval over training seeds and test seeds. Table 1: each run's selected draw per
    training seed (iga.experiment.sweep.select), under each of the two selection rules; Table 2: every run at
    draw 0, IGA's included. Refused when the pairs ran under different train precisions or evaluation dtypes."""
    ex = params.experiment
    check_comparable({f"{r['run']}/draw{r['draw']}/seed{r['seed']}": r["ran"] for r in results}, "the experiment's "
                     "tables")
    first = [*ex.table1, *([ex.oracle] if ex.oracle else [])]  # Table 1's runs and its reference
    by_seed = lambda rows: sorted(rows, key=lambda r: r["seed"])  # noqa: E731
    selected = {rule: select((r for r in results if r["run"] in first), rule) for rule in SELECTIONS}
    tables = {rule: {name: [chosen[(name, seed)] for seed in ex.seeds] for name in first}  # Table 1 under each rule
              for rule, chosen in selected.items()}
    tables[2] = {name: by_seed(r for r in results if r["run"] == name and r["draw"] == 0)
                 for name in ("iga", *ex.table2)}
    evaluations = {n: {name: [r["evaluation"] for r in rows] for name, rows in t.items()} for n, t in tables.items()}
    summaries = {n: {name: summarize(evaluations[n][name], rows[0]["lcs_layers"]) for name, rows in t.items()}
                 for n, t in tables.items()}
    ran = results[0]["ran"]
    scale = (f"{ex.steps} steps x {params.train.groups_per_batch * len(params.domains.train)} sequences per run, "
             f"{len(ex.seeds)} training seeds ({', '.join(map(str, ex.seeds))}); NLL and LCS on every test seed "
             f"({summaries[2]['iga']['nll_n_seeds']}), accuracy on the first {ex.eval_groups} "
             f"({ex.eval_groups * len(params.domains.train)} ID / {ex.eval_groups * len(params.domains.ood)} OOD "
             f"problems), max_new_tokens {ex.max_new_tokens}, student {params.student.base}, trained in "
             f"{ran['train_precision']}, evaluated in {ran['eval_dtype']}")
    run_s = sum(r["train"]["train_s"] + r["train"]["eval_s"] for r in results)  # training + evaluation, all runs
    selection = {rule: f"model selection: {rule}, {ex.hparam_draws} draws per method (draw 0: the configured "
                       f"hyperparameters); for each training seed the draw with the best accuracy on "
                       f"{validation_of(tables[rule][first[0]][0], rule)['n']} "
                       f"{'training' if part is None else 'held-out'}-domain problems of {ex.val_seeds} training "
                       "seeds held out of every run's training" for rule, part in SELECTIONS.items()}
    shown = next(iter(SELECTIONS))  # training-domain validation: the report's runs
    runs = [RunResult(r["run"], r["seed"], r["eval"], r["train"], r["history"]) for rows in tables[shown].values()
            for r in rows]
    written = write_report(EXPERIMENT_REPORT, runs, summaries=summaries[shown], evaluations=evaluations[shown],
                           title="Experiment: Table 1's runs", notes=[scale, selection[shown]])
    parts = [table1(summaries[rule], evaluations[rule], "iga", f"{scale}; {selection[rule]}", run_s, ex.oracle, rule)
             + "\n" + selection_table(tables[rule], ex.hparam_draws, rule, part) for rule, part in SELECTIONS.items()]
    texts = {1: "\n".join(parts),
             2: table2(summaries[2], evaluations[2], ex.runs, "iga", f"{scale}; every run at the configured "
                       "hyperparameters (draw 0), IGA's included: an ablation changes one thing"),
             3: table3(json.loads(COST.read_text()))}
    for n, text in texts.items():
        atomic_write_text(TABLES[n], text)
    mlflow = tracking.mlflow_module()
    parent = tracking.experiment_parent()
    for path in [*TABLES.values(), *written]:
        mlflow.MlflowClient().log_artifact(parent, str(path), "report")
    return [*TABLES.values(), *written]
