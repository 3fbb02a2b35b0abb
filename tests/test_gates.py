"""The GX gates on crafted rows: thresholds are inclusive and every rejection names its reason."""
import pytest

from conftest import ROOT
from iga.data.gates import Gate, final_verdict, regenerable
from iga.params import load_params

P = load_params(ROOT / "params.yaml")
TRAIN, OOD = P.domains.train, P.domains.ood


def row(group, domain, *, alignment=1.0, steps=3, error=None, answer="7"):
    cot = None if error else "\n".join(f"Step {i}: x" for i in range(1, steps + 1)) + f"\nAnswer: {answer}"
    return {"seed_id": group, "group_id": group, "domain": domain, "domain_kind": "train" if domain in TRAIN else "ood",
            "problem": None if error else "p", "cot_solution": cot, "answer": None if error else answer,
            "alignment_score": None if error else alignment, "step_count": None if error else steps,
            "error": error, "flaw": None}


def group(name, **per_domain):
    return [row(name, d, **per_domain.get(d, {})) for d in TRAIN + OOD]


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    g = Gate(P.gate, P.domains, docs)
    g.docs = docs
    return g


def test_alignment_threshold_is_inclusive(gate):
    rows = group("a", medical={"alignment": 0.85}) + group("b", legal={"alignment": 0.84})
    rejected = gate.validate(rows)
    assert rejected[("b", "legal")] == ["low_alignment"]
    assert not any(k[0] == "a" for k in rejected)
    # b's siblings wait for legal: flagged incomplete, but not sent back to the teacher.
    assert rejected[("b", "medical")] == ["incomplete_group"]
    assert regenerable(rejected) == [("b", "legal")]


def test_step_spread(gate):
    two = group("two", mathematics={"steps": 2}, science={"steps": 4})
    three = group("three", mathematics={"steps": 2}, science={"steps": 5})
    rejected = gate.validate(two + three)
    assert {k for k in rejected} == {("three", d) for d in TRAIN + OOD}
    assert all(v == ["step_spread"] for v in rejected.values())


def test_missing_domain_is_incomplete(gate):
    rows = [r for r in group("m") if r["domain"] != "science"]
    rejected = gate.validate(rows)
    assert {k for k in rejected} == {("m", d) for d in TRAIN + OOD if d != "science"}
    assert all(v == ["incomplete_group"] for v in rejected.values())
    accepted, rejects = final_verdict(rows, rejected)
    assert accepted == [] and {r["reason"] for r in rejects} == {"incomplete_group"}


def test_instance_reasons(gate):
    rows = (group("e", legal={"error": "extract: invalid JSON"}) + group("x", medical={"answer": ""})
            + [row("u", d) for d in TRAIN] + [row("u", "astrology")])
    rows[len(TRAIN + OOD) + 1]["cot_solution"] = "Step 1: x\nthe answer is unclear"
    rejected = gate.validate(rows)
    assert set(rejected[("e", "legal")]) >= {"teacher_error", "missing_problem", "missing_alignment_score"}
    assert "no_extractable_answer" in rejected[("x", "medical")]
    assert rejected[("u", "astrology")] == ["unknown_domain"]


def test_final_verdict_drops_group_for_train_failures_only(gate):
    rows = group("t", legal={"alignment": 0.5}) + group("o", finance={"alignment": 0.5})
    accepted, rejects = final_verdict(rows, gate.validate(rows))
    assert {r["group_id"] for r in accepted} == {"o"}
    assert [r["domain"] for r in rejects if r["group_id"] == "o"] == ["finance"]
    assert len([r for r in rejects if r["group_id"] == "t"]) == len(TRAIN + OOD)
    assert (gate.docs / "index.html").is_file()
