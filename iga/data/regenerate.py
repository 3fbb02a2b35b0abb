"""The gate's loop (paper §3.3): validate, send the rejected back to the teacher, validate again, up to
`gate.max_attempts`; then the final verdict drops what still fails.

The teacher calls arrive as functions so that the caller decides how they run (the gate flow maps
them over chunks as retried Prefect tasks); this module decides only what is asked and when.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from iga.data.gates import INCOMPLETE, Key, reasons_of, regenerable, retried_rows

Row = dict[str, Any]


@dataclass
class Regeneration:
    rows: list[Row]  # every instance's last attempt
    rejected: dict[Key, list[str]]  # the last validation's failures
    retried: list[Row]  # every attempt that was regenerated, as a reject row
    regenerated: list[Row]  # every new attempt
    dags: dict[str, Row]  # every seed's extraction as the gate last used it


def regenerate(rows: list[Row], seeds: dict[str, Row], dags: dict[str, Row], max_attempts: int,
               validate: Callable[[list[Row]], dict[Key, list[str]]],
               reextract: Callable[[list[tuple[Row, int]]], list[Row]],
               reinstantiate: Callable[[list[tuple[Row, Row, str, int]]], list[Row]]) -> Regeneration:
    """`validate(rows)` -> failures by key; `reextract([(seed, attempt)])` -> new extractions;
    `reinstantiate([(seed, extraction, domain, attempt)])` -> new instance rows."""
    dags = dict(dags)
    retried, regenerated = [], []
    for attempt in range(2, max_attempts + 2):
        rejected = validate(rows)
        keys = regenerable(rejected) if attempt <= max_attempts else []
        if not keys:
            break
        retried += retried_rows(rows, rejected, keys)
        seed_of = {(r["group_id"], r["domain"]): r["seed_id"] for r in rows}
        # A seed whose extract or annotate call failed has no DAG to instantiate: ask for it again first.
        lost = sorted({seed_of[k] for k in keys if dags[seed_of[k]]["error"]})
        if lost:
            dags |= {d["seed_id"]: d for d in reextract([(seeds[s], attempt) for s in lost])}
        new = reinstantiate([(seeds[seed_of[k]], dags[seed_of[k]], k[1], attempt) for k in keys])
        regenerated += new
        fresh = {(r["group_id"], r["domain"]): r for r in new}
        rows = [fresh.get((r["group_id"], r["domain"]), r) for r in rows]
    return Regeneration(rows, rejected, retried, regenerated, dags)

def gate_metrics(outcome: Regeneration, accepted: list[dict[str, Any]], final_rejects: list[dict[str, Any]], audit: bool
                 ) -> dict[str, Any]:
    """metrics/gate.json from a regeneration's outcome and its final verdict.
    `audit` (the procedural teacher, which knows its own flaws): how many flawed instances the gates
    let through, by kind, and how many flawed and clean attempts they rejected."""
    rejects = outcome.retried + final_rejects
    groups = {r["group_id"] for r in outcome.rows}
    kept = {r["group_id"] for r in accepted if r["domain_kind"] == "train"}
    reasons = Counter(why for r in rejects for why in reasons_of(r))
    metrics = {
        "groups_generated": len(groups), "groups_kept": len(kept),
        "kept_fraction": round(len(kept) / max(1, len(groups)), 4),
        "instances_accepted": len(accepted), "attempts_rejected": len(rejects),
        "regenerations": len(outcome.regenerated),
        "extractions_regenerated": sum(d.get("attempt", 1) > 1 for d in outcome.dags.values()),
        "ood_instances_dropped": sum(r["domain_kind"] == "ood" and r["group_id"] in kept for r in final_rejects),
        "rejections_by_reason": dict(sorted(reasons.items())),
    }
    if audit:
        metrics["flawed_accepted_by_kind"] = dict(Counter(r["flaw"] for r in accepted if r["flaw"]))
        own = [r for r in rejects if set(reasons_of(r)) - {INCOMPLETE}]
        metrics["flawed_attempts_rejected"] = sum(r["flaw"] is not None for r in own)
        metrics["clean_attempts_rejected"] = sum(r["flaw"] is None and r["error"] is None for r in own)
    return metrics
