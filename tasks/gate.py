from __future__ import annotations

import shutil
from collections import Counter
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.gates import INCOMPLETE, Gate, Key, final_verdict, reasons_of
from iga.health import check_gate
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from tasks.paths import ACCEPTED, DAGS, GATE_DOCS, GATE_METRICS, INSTANCES, GATE_DAGS, REGENERATED, REJECTS, SEEDS

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
def write_gate_outputs(rows: list[Row], rejected: dict[Key, list[str]], retried: list[Row],
                       regenerated: list[Row], dags: list[Row], params: Params) -> dict[str, Any]:
    """Final verdict on the last attempts; rejects = every retried attempt + every final failure;
    dags = every seed's DAG as the gate last used it (a regenerated extraction replaces a failed one)."""
    accepted, final_rejects = final_verdict(rows, rejected)
    rejects = retried + final_rejects
    groups = {r["group_id"] for r in rows}
    kept = {r["group_id"] for r in accepted if r["domain_kind"] == "train"}
    reasons = Counter(why for r in rejects for why in reasons_of(r))
    metrics = {
        "groups_generated": len(groups), "groups_kept": len(kept),
        "kept_fraction": round(len(kept) / max(1, len(groups)), 4),
        "instances_accepted": len(accepted), "attempts_rejected": len(rejects),
        "regenerations": len(regenerated),
        "extractions_regenerated": sum(d.get("attempt", 1) > 1 for d in dags),
        "ood_instances_dropped": sum(r["domain_kind"] == "ood" and r["group_id"] in kept for r in final_rejects),
        "rejections_by_reason": dict(sorted(reasons.items())),
    }
    if params.teacher.provider == "procedural":  # the teacher knows its own mistakes: audit the gates
        metrics["flawed_accepted_by_kind"] = dict(Counter(r["flaw"] for r in accepted if r["flaw"]))
        own = [r for r in rejects if set(reasons_of(r)) - {INCOMPLETE}]
        metrics["flawed_attempts_rejected"] = sum(r["flaw"] is not None for r in own)
        metrics["clean_attempts_rejected"] = sum(r["flaw"] is None and r["error"] is None for r in own)
    write_jsonl(ACCEPTED, accepted)
    write_jsonl(REJECTS, rejects)
    write_jsonl(REGENERATED, regenerated)
    write_jsonl(GATE_DAGS, dags)
    write_json(GATE_METRICS, metrics)
    get_run_logger().info("kept %d/%d groups (%.1f%%), %d regenerations; Data Docs: %s",
                          len(kept), len(groups), 100 * metrics["kept_fraction"], len(regenerated),
                          GATE_DOCS / "index.html")
    check_gate(metrics, params.gate.min_kept_fraction, [r["error"] for r in rejects if r["error"]])
    return metrics
