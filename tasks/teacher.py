"""Teacher calls, a chunk of seeds (or regeneration requests) per task: a submitted Prefect task
costs ~90 ms, so one task per call would cost more than a procedural call itself. Within a chunk
the openai teacher makes its calls concurrently; one teacher (and its call engine) serves all the
chunk tasks of a stage, so the concurrency, rate limits and budget hold across them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from iga.data.health import check_teacher
from iga.data.teacher import Teacher, make_teacher
from iga.data.teacher.ledger import totals
from iga.errors import ConfigError, TeacherAbort
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from tasks.paths import DAGS, INSTANCES, SEEDS, TEACHER_METRICS

Row = dict[str, Any]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def retry_unless_aborted(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retries a crashed chunk, but not a stop on purpose (HTTP 401, the budget)."""
    return not isinstance(state.result(raise_on_failure=False), TeacherAbort)


def chunk_task(fn):
    return task(fn, cache_policy=NO_CACHE, retry_condition_fn=retry_unless_aborted)


@task(cache_policy=NO_CACHE)
def read_seeds() -> list[Row]:
    return read_jsonl(SEEDS)


@task(cache_policy=NO_CACHE)
def open_teacher(params: Params, *earlier_ledgers: Path) -> Teacher:
    """The stage's teacher; the spending earlier teacher stages recorded counts against the budget."""
    spent = sum(totals(read_jsonl(path))["cost_usd"] or 0.0 for path in earlier_ledgers)
    return make_teacher(params, spent_usd=spent)


@chunk_task
def teach_chunk(seeds: list[Row], teacher: Teacher) -> tuple[list[Row], list[Row]]:
    """Extract each seed's DAG, then instantiate it once in every domain (attempt 1)."""
    dags = teacher.map(teacher.extraction, seeds)
    jobs = [(seed, dag, domain) for seed, dag in zip(seeds, dags, strict=True) for domain in teacher.params.domains.all]
    return dags, teacher.map(lambda job: teacher.isomer(*job, attempt=1), jobs)


@chunk_task
def reextract_chunk(requests: list[tuple[Row, int]], teacher: Teacher) -> list[Row]:
    """New extractions (extract, and annotate for a seed without a CoT) of seeds that have no DAG:
    (seed, attempt) each."""
    return teacher.map(lambda request: teacher.extraction(*request), requests)


@chunk_task
def regenerate_chunk(requests: list[tuple[Row, Row, str, int]], teacher: Teacher) -> list[Row]:
    """New attempts for rejected instances: (seed, extraction, domain, attempt) each."""
    return teacher.map(lambda request: teacher.isomer(*request), requests)


@chunk_task
def sample_chunk(jobs: list[tuple[Row, Row]], teacher: Teacher, k: int) -> list[list[Row]]:
    """k candidate CoTs of each training instance, (seed, row) each: its own, then k - 1 samples."""
    calls = [(seed, row, j) for seed, row in jobs for j in range(k)]
    candidates = teacher.map(lambda call: teacher.sample(*call), calls)
    return [candidates[i:i + k] for i in range(0, len(candidates), k)]


@task(cache_policy=NO_CACHE)
def close_teacher(teacher: Teacher, ledger: Path) -> dict[str, Any]:
    """Write the stage's ledger (also after a stop: what was paid is accounted for) and its totals."""
    teacher.close()
    rows = teacher.ledger()
    write_jsonl(ledger, rows)
    summary = totals(rows)
    if rows:
        get_run_logger().info("teacher: %d calls, %d paid, %d cache hits, %d retries, %d tokens, $%s -> %s",
                              summary["calls"], summary["paid_calls"], summary["cache_hits"], summary["retries"],
                              summary["prompt_tokens"] + summary["completion_tokens"], summary["cost_usd"], ledger)
    return summary


@task(cache_policy=NO_CACHE)
def write_teacher_metrics(params: Params, stages: dict[str, Path]) -> dict[str, Any]:
    """metrics/teacher.json: the totals per teacher stage and together; logged to MLflow for the openai teacher."""
    ledgers = {name: read_jsonl(path) for name, path in stages.items()}
    per_stage = {name: totals(rows) for name, rows in ledgers.items()}
    metrics = {"provider": params.teacher.provider, "mode": params.teacher.mode, "model": params.teacher.openai.model,
               "total": totals([r for rows in ledgers.values() for r in rows]), **per_stage}
    write_json(TEACHER_METRICS, metrics)
    if params.teacher.provider == "openai":
        from tasks.tracking import flat_params, mlflow_module

        mlflow = mlflow_module()
        with mlflow.start_run(run_name="teacher", tags={"stage": "teacher"}):
            t = params.teacher
            mlflow.log_params(flat_params("teacher", {
                "model": t.openai.model, "base_url": t.openai.base_url, "mode": t.mode, "concurrency": t.concurrency,
                "rpm": t.rpm, "tpm": t.tpm, "budget_usd": t.budget_usd, "prompt_version": t.openai.prompt_version}))
            mlflow.log_metrics({f"teacher.{stage}.{k}": v for stage, s in [("total", metrics["total"]), *per_stage.items()]
                                for k, v in s.items() if isinstance(v, (int, float))})
            mlflow.log_artifact(str(TEACHER_METRICS))
            for path in stages.values():
                mlflow.log_artifact(str(path), artifact_path="ledger")
    return metrics


@task(cache_policy=NO_CACHE)
def estimate_teacher(params: Params, seeds: list[Row]) -> dict[str, Any]:
    from iga.data.teacher.estimate import estimate, render

    if params.teacher.provider != "openai":
        raise ConfigError("flows.estimate: teacher.provider is procedural, which costs nothing; "
                          "set teacher.provider: openai to estimate a real teacher")
    est = estimate(params, seeds)
    print(render(est))
    return est


@task(cache_policy=NO_CACHE)
def write_isomers(dags: list[Row], rows: list[Row]) -> None:
    write_jsonl(DAGS, dags)
    write_jsonl(INSTANCES, rows)
    failed = sum(r["error"] is not None for r in rows)
    get_run_logger().info("%d DAGs (%d failed), %d instances (%d teacher errors) -> %s",
                          len(dags), sum(d["error"] is not None for d in dags), len(rows), failed, INSTANCES)
    check_teacher(dags, rows)

