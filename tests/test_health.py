"""Health floors (iga.data.health): each data stage fails below its floor with the count and the top reasons."""
import pytest

from iga.data.health import check_gate, check_split, check_teacher, top
from iga.errors import HealthError


def test_top_counts_a_message_once_whatever_its_seed():
    reasons = [f"extract: DAG of seed s{i}: edges form a cycle" for i in range(5)] + ["HTTP 500"] * 2 + ["x"]
    assert top(reasons, 2) == "extract: DAG of seed <id>: edges form a cycle (x5); HTTP 500 (x2)"
    assert top([]) == "none recorded"


def test_a_stage_where_every_teacher_call_failed_fails():
    dags = [{"error": "extract: connection error"}] * 2
    rows = [{"error": "no DAG for this seed (extract: connection error)"}] * 12
    with pytest.raises(HealthError, match=r"isomers: every teacher call failed \(2 DAGs, 12 instances\); top errors: "
                                          r"no DAG for this seed \(extract: connection error\) \(x12\); extract"):
        check_teacher(dags, rows)
    check_teacher(dags, rows[:-1] + [{"error": None}])  # one instance came back: the gate judges the rest
    check_teacher([], [])  # no seeds is the seeds stage's business


def gate_metrics(kept: int, generated: int) -> dict:
    return {"groups_kept": kept, "groups_generated": generated, "kept_fraction": round(kept / generated, 4),
            "rejections_by_reason": {"teacher_error": 90, "low_alignment": 7, "step_spread": 3, "incomplete_group": 1}}


def test_the_gate_fails_below_its_floor_with_its_top_reasons():
    with pytest.raises(HealthError) as e:
        check_gate(gate_metrics(12, 40), 0.5, ["no DAG for this seed (HTTP 500)"] * 3)
    assert str(e.value) == (
        "gate: kept 12 of 40 groups (30 %), below gate.min_kept_fraction 0.5; top rejections: teacher_error (x90); "
        "low_alignment (x7); step_spread (x3); top teacher errors: no DAG for this seed (HTTP 500) (x3)")
    check_gate(gate_metrics(20, 40), 0.5, [])  # at the floor passes
    with pytest.raises(HealthError, match="kept 0 of 40"):
        check_gate(gate_metrics(0, 40), 0.0, [])  # nothing kept fails whatever the floor


@pytest.mark.parametrize("side", ["train", "test"])
def test_a_split_with_an_empty_side_fails(side):
    rows = {"train": 10, "test": 4, "ood": 2} | {side: 0}
    metrics = {"seeds_train": 5, "seeds_test": 2, "rows": rows, "test_fraction_requested": 0.2}
    with pytest.raises(HealthError, match=f"split: no {side} rows"):
        check_split(metrics)
    check_split(metrics | {"rows": {"train": 10, "test": 4, "ood": 0}})  # no OOD rows: a smaller report, not an error
