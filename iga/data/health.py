"""Health floors of the data stages: below its floor a stage fails with one line naming the stage, the
count and the commonest reasons, instead of exiting 0 on an empty or gutted output."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

from iga.errors import HealthError

Row = dict[str, Any]
_SEED_ID = re.compile(r"\bseed [\w.-]+")  # a seed id makes every message unique: count them as one


def top(reasons: Iterable[str] | Counter, n: int = 3) -> str:
    """'reason (xcount); ...' for the n commonest reasons (messages, or counts of them)."""
    counts = reasons if isinstance(reasons, Counter) else Counter(_SEED_ID.sub("seed <id>", r)[:160] for r in reasons)
    return "; ".join(f"{why} (x{k})" for why, k in counts.most_common(n)) or "none recorded"


def check_teacher(dags: list[Row], rows: list[Row]) -> None:
    """The isomers stage: at least one extraction and one instance came back."""
    failed = [d["error"] for d in dags if d["error"]] + [r["error"] for r in rows if r["error"]]
    if len(failed) == len(dags) + len(rows) and failed:
        raise HealthError(f"isomers: every teacher call failed ({len(dags)} DAGs, {len(rows)} instances); "
                          f"top errors: {top(failed)}")


def check_gate(metrics: dict[str, Any], min_kept_fraction: float, errors: Iterable[str]) -> None:
    """The gate stage: at least gate.min_kept_fraction of the groups kept."""
    if metrics["groups_kept"] and metrics["kept_fraction"] >= min_kept_fraction:
        return
    raise HealthError(f"gate: kept {metrics['groups_kept']} of {metrics['groups_generated']} groups "
                      f"({100 * metrics['kept_fraction']:.0f} %), below gate.min_kept_fraction {min_kept_fraction}; "
                      f"top rejections: {top(Counter(metrics['rejections_by_reason']))}; "
                      f"top teacher errors: {top(errors)}")


def check_split(metrics: dict[str, Any]) -> None:
    """The split stage: rows on both the train and the test side."""
    rows = metrics["rows"]
    for side in ("train", "test"):
        if not rows[side]:
            raise HealthError(f"split: no {side} rows ({metrics['seeds_train']} train and {metrics['seeds_test']} "
                              f"test seeds; rows {rows}): the gate kept too few groups, or split.test_fraction "
                              f"{metrics['test_fraction_requested']} leaves a side empty")
