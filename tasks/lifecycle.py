"""The lifecycle's own steps around `dvc repro`: gather what it produced, and report it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.errors import DataError, IGAError
from iga.io import exclusive, leftover_temporaries, read_jsonl
from iga.params import Params
from iga.report.comparable import check_comparable
from iga.report.report import RunResult, table1, write_report
from iga.stages import params_hash
from tasks import tracking
from tasks.dvc import dvc
from tasks.paths import LIFECYCLE_LOCK, REPORTS, eval_metrics, history_file, scores_file, train_metrics

# Where a killed run can leave the temporary siblings of its atomic writes.
OUTPUT_DIRS = ("data", "models", "metrics", "plots", "reports")


def one_at_a_time():
    """The lifecycle's lock: a second run in the same project (a scheduled one firing while a manual one
    goes) stops at once with a clear message instead of racing the first over the same files."""
    return exclusive(LIFECYCLE_LOCK, "a lifecycle run")


@task(cache_policy=NO_CACHE)
def clean_up_after_kills() -> None:
    """What a killed lifecycle left, removed under the lock (no other run can be writing): the temporary
    files of interrupted atomic writes, and MLflow lifecycle runs still marked RUNNING."""
    log = get_run_logger()
    partial = [p for d in OUTPUT_DIRS for p in leftover_temporaries(d)]
    for path in partial:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if partial:
        log.info("removed %d temporary files of interrupted writes", len(partial))
    mlflow = tracking.mlflow_module()
    client = mlflow.MlflowClient()
    running = "attributes.status = 'RUNNING'"
    for parent in mlflow.search_runs(filter_string=f"tags.lifecycle = 'parent' and {running}", output_format="list"):
        children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and {running}",
                                      output_format="list")
        for run in [*children, parent]:
            client.set_terminated(run.info.run_id, "KILLED")
        log.info("MLflow run %s of a killed lifecycle run marked KILLED", parent.info.run_id)


@task(cache_policy=NO_CACHE)
def reproduce() -> None:
    """`dvc repro evaluate`: data → train → evaluate, only what changed; dvc.lock records what ran."""
    if not Path(".dvc").is_dir():
        dvc("init", "-q")
    try:
        dvc("repro", "evaluate")  # not the experiment
    except IGAError as e:
        raise IGAError(f"{e}; the failing stage's output is above. Nothing was registered.") from None


def load_eval_metrics(params: Params, method: str) -> dict[str, Any]:
    """metrics/eval/<method>.json, refused when it was computed under other params."""
    path = eval_metrics(method)
    if not path.is_file():
        raise DataError(f"{path}: no evaluation of {method}; run `dvc repro evaluate@{method}`")
    metrics, expected = json.loads(path.read_text()), params_hash("evaluate", params, method)
    if metrics.get("params_hash") != expected:
        raise DataError(f"{path}: computed under another params.yaml (params_hash {metrics.get('params_hash')}, "
                        f"now {expected}); run `dvc repro` to re-evaluate")
    return metrics


@task(cache_policy=NO_CACHE)
def collect(params: Params) -> list[RunResult]:
    """Each method's training summary, loss history and evaluation, checked against params.yaml and against
    each other: one report holds one train precision and one evaluation dtype (`auto` resolves per machine)."""
    results = []
    for method in params.train.methods:
        results.append(RunResult(method=method, seed=params.train.seed, eval=load_eval_metrics(params, method),
                                 train=json.loads(train_metrics(method).read_text()),
                                 history=read_jsonl(history_file(method))))
    check_comparable({r.method: {"train_precision": r.train.get("precision"), "eval_dtype": r.eval.get("dtype")}
                      for r in results}, "metrics/train and metrics/eval")
    return results


@task(cache_policy=NO_CACHE)
def report(params: Params, results: list[RunResult], registry: dict[str, Any]) -> list[Path]:
    """reports/summary.md and its plots, also attached to the lifecycle's parent MLflow run."""
    rp = params.registry
    notes = ["MLflow registered model versions: " + ", ".join(f"{m} v{v}" for m, v in registry["versions"].items()),
             f"champion: v{registry['champion']}, challenger: "
             + (f"v{registry['challenger']}" if registry["challenger"] else "none")
             + f" (promotion on {rp.primary_metric}: a one-sided paired test at α = {rp.alpha} and at least "
               f"{rp.min_delta} better)",
             *registry["decision"]]
    evaluations = {r.method: [{"scores": read_jsonl(scores_file(r.method))}] for r in results}
    files = write_report(REPORTS, results, evaluations=evaluations, notes=notes)
    mlflow = tracking.mlflow_module()
    mlflow.MlflowClient().log_artifacts(registry["parent_run_id"], str(REPORTS), "report")
    get_run_logger().info("report -> %s (also on MLflow run %s)", files[-1], registry["parent_run_id"])
    return files


def summary(results: list[RunResult], registry: dict[str, Any], files: list[Path]) -> str:
    """What `python -m flows.lifecycle` prints at the end: the table and where to look."""
    uri = tracking.tracking_uri()
    return "\n".join([table1(results), "", *registry["decision"], "",
                      f"report:   {files[-1]}",
                      f"champion: models:/{registry['model_name']}@champion (v{registry['champion']})",
                      f"mlflow:   mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite")
                      else f"mlflow:   {uri}",
                      "dvc:      dvc metrics show; dvc plots show"])
