from __future__ import annotations

import shutil
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.gates import Gate, Key, final_verdict
from iga.data.health import check_gate
from iga.data.regenerate import Regeneration, gate_metrics
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from tasks.paths import ACCEPTED, DAGS, GATE_DAGS, GATE_DOCS, GATE_METRICS, INSTANCES, REGENERATED, REJECTS, SEEDS

Row = dict[str, Any]


@task(cache_policy=NO_CACHE)
def read_gate_inputs() -> tuple[dict[str, Row], dict[str, Row], list[Row]]:
    seeds = {s["seed_id"]: s for s in read_jsonl(SEEDS)}
    dags = {d["seed_id"]: d for d in read_jsonl(DAGS)}
    return seeds, dags, read_jsonl(INSTANCES)


@task(cache_policy=NO_CACHE)
def open_gate(params: Params) -> Gate:
    shutil.rmtree(GATE_DOCS, ignore_errors=True)  # Data Docs of this run only
    return Gate(params.gate, params.domains, GATE_DOCS)


@task(cache_policy=NO_CACHE)
def validate(gate: Gate, rows: list[Row]) -> dict[Key, list[str]]:
    return gate.validate(rows)


@task(cache_policy=NO_CACHE)
def write_gate_outputs(outcome: Regeneration, params: Params) -> dict[str, Any]:
    """Final verdict on the last attempts; rejects = every retried attempt + every final failure;
    dags = every seed's DAG as the gate last used it (a regenerated extraction replaces a failed one)."""
    accepted, final_rejects = final_verdict(outcome.rows, outcome.rejected)
    rejects = outcome.retried + final_rejects
    metrics = gate_metrics(outcome, accepted, final_rejects, audit=params.teacher.provider == "procedural")
    write_jsonl(ACCEPTED, accepted)
    write_jsonl(REJECTS, rejects)
    write_jsonl(REGENERATED, outcome.regenerated)
    write_jsonl(GATE_DAGS, list(outcome.dags.values()))
    write_json(GATE_METRICS, metrics)
    get_run_logger().info("kept %d/%d groups (%.1f%%), %d regenerations; Data Docs: %s",
                          metrics["groups_kept"], metrics["groups_generated"], 100 * metrics["kept_fraction"],
                          len(outcome.regenerated), GATE_DOCS / "index.html")
    check_gate(metrics, params.gate.min_kept_fraction, [r["error"] for r in rejects if r["error"]])
    return metrics
