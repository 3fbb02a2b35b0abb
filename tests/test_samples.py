"""CoT styles of the procedural teacher (iga.data.program.render) and candidate CoTs (Teacher.sample)."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from conftest import ROOT
from iga.data.answers import count_steps
from iga.data.dag import LogicalDAG
from iga.data.domains import DOMAINS
from iga.data.program import STYLE_LINES, Program, Step, render, topological_order
from iga.data.seeds import procedural_seeds
from iga.data.teacher import make_teacher
from iga.data.teacher.procedural import STYLES
from iga.params import load_params

SEED0_MATH = (  # seed proc-0-00000 in mathematics, attempt 1: what the teacher wrote before styles existed
    "Let the first term be 22. Define the perimeter of the square to be 4 times the first term. Let the product p "
    "equal the sum of the perimeter of the square and the first term. Define the value of x to be 4 times the "
    "product p. What is the value of x?",
    "Step 1: the perimeter of the square = 22 * 4 = 88.\nStep 2: the product p = 88 + 22 = 110.\n"
    "Step 3: the value of x = 110 * 4 = 440.\nAnswer: 440",
)


def _teacher(**overrides):
    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": 60, **overrides})
    return params, make_teacher(params), procedural_seeds(params.seeds)


@pytest.fixture(scope="module")
def setup():
    return _teacher()


def _rows(teacher, params, seeds):
    return [(s, teacher.isomer(s, teacher.extraction(s), d, 1)) for s in seeds for d in params.domains.all]


def _body(line: str) -> str:
    return re.sub(r"^Step \d+: ", "", line)


def test_plain_is_unchanged(setup):
    params, teacher, seeds = setup
    s = seeds[0]
    inst = teacher.instantiate(s, LogicalDAG.from_dict(s["dag"], "x"), "mathematics", 1)
    assert (inst["problem"], inst["cot_solution"]) == SEED0_MATH
    d = DOMAINS["legal"]
    for s in seeds[:12]:
        draw = teacher.draw(s, "legal", 1)
        default = render(draw.program, d.templates, d.unit, draw.names, random.Random(1), draw.extra)
        plain = render(draw.program, d.templates, d.unit, draw.names, random.Random(1), draw.extra, style="plain",
                       order_rng=random.Random(2))
        assert default == plain


@pytest.mark.parametrize("style", [s for s in STYLES if s != "plain"])
def test_the_teachers_style_changes_only_the_cot(setup, style):
    params, teacher, seeds = setup
    _, styled, _ = _teacher(**{"teacher.style": style})
    for s in seeds[:15]:
        dag = LogicalDAG.from_dict(s["dag"], "x")
        for d in params.domains.all:
            a, b = teacher.instantiate(s, dag, d, 1), styled.instantiate(s, dag, d, 1)
            assert a["problem"] == b["problem"] and a["answer"] == b["answer"] and a["flaw"] == b["flaw"]
            assert a["instance_dag"] == b["instance_dag"]
            assert count_steps(a["cot_solution"]) == count_steps(b["cot_solution"])
            assert a["cot_solution"].splitlines()[-1] == b["cot_solution"].splitlines()[-1]


def test_every_style_keeps_lines_and_answer_in_every_domain_and_family():
    params, teacher, seeds = _teacher(**{"teacher.flaw_rate": 0.0})
    assert {s["family"] for s in seeds[:6]} == {"arithmetic", "implication", "comparison"}
    assert set(STYLE_LINES) == set(STYLES)
    for s in seeds[:6]:
        for name, d in DOMAINS.items():
            draw = teacher.draw(s, name, 1)
            plain = render(draw.program, d.templates, d.unit, draw.names, random.Random(0))
            for style in STYLES:
                problem, cot = render(draw.program, d.templates, d.unit, draw.names, random.Random(0), style=style)
                lines = cot.splitlines()
                assert problem == plain[0]
                assert len(lines) == len(plain[1].splitlines()) == s["dag"]["step_count"] + 1
                assert lines[-1] == f"Answer: {s['answer']}"
                assert [re.match(r"Step (\d+): \S", ln).group(1) for ln in lines[:-1]] == \
                    [str(i) for i in range(1, len(lines))]
                assert count_steps(cot) == s["dag"]["step_count"]
                if style not in ("plain", "reordered"):
                    assert cot != plain[1], (style, name)


def test_terse_verbose_restated_lines():
    prog = Program("arithmetic", (("q0", 22),), (Step("q1", "mul_c", ("q0",), 4), Step("q2", "add", ("q1", "q0"))))
    names = {"q0": "the first term", "q1": "the perimeter of the square", "q2": "the product p"}
    d = DOMAINS["mathematics"]
    cot = {st: render(prog, d.templates, d.unit, names, random.Random(0), style=st)[1].splitlines() for st in STYLES}
    assert cot["terse"][:2] == ["Step 1: 22 * 4 = 88.", "Step 2: 88 + 22 = 110."]
    assert cot["verbose"][1] == "Step 2: the product p = 88 + 22 = 110. This is the quantity the question asks for."
    assert cot["verbose"][0].endswith("= 88. We will use this below.")
    assert cot["restated"][1] == ("Step 2: we have the perimeter of the square = 88 and the first term = 22, so the "
                                  "product p = 88 + 22 = 110.")
    imp = Program("implication", (("p0", True),), (Step("p1", "then", ("p0",)), Step("p2", "then_not", ("p1",))))
    names = {"p0": "n is even", "p1": "m is prime", "p2": "x is positive"}
    terse = render(imp, d.templates, d.unit, names, random.Random(0), style="terse")[1].splitlines()
    assert terse == ["Step 1: therefore m is prime.", "Step 2: therefore not x is positive.", "Answer: no"]


def _is_topological(order: list[Step], program: Program) -> bool:
    hidden = {s.out: s.args for s in program.steps if s.out in program.hidden}

    def roots(a):
        return {x for b in hidden[a] for x in roots(b)} if a in hidden else {a}
    placed: set[str] = set()
    outs = {s.out for s in order}
    for s in order:
        if not {x for a in s.args for x in roots(a)} & outs <= placed:
            return False
        placed.add(s.out)
    return True


def test_reordered_is_another_topological_order_where_one_exists():
    # q3 stands on q1 through the unwritten q2; q4 is independent of q1 and q3; q5 needs both
    prog = Program("arithmetic", (("q0", 5),), (
        Step("q1", "add_c", ("q0",), 2), Step("q2", "add_c", ("q1",), 3), Step("q3", "add_c", ("q2",), 4),
        Step("q4", "mul_c", ("q0",), 2), Step("q5", "add", ("q3", "q4"))), hidden=frozenset({"q2"}))
    written = [s for s in prog.steps if s.out not in prog.hidden]
    orders = set()
    for k in range(30):
        order = topological_order(written, prog, random.Random(k))
        assert sorted(s.out for s in order) == sorted(s.out for s in written)
        assert _is_topological(order, prog) and order != written
        orders.add(tuple(s.out for s in order))
    assert len(orders) > 1  # seeded
    chain = Program("arithmetic", (("q0", 5),), (Step("q1", "add_c", ("q0",), 2), Step("q2", "add_c", ("q1",), 3)))
    assert topological_order(list(chain.steps), chain, random.Random(0)) == list(chain.steps)  # no other order

    names = {f"q{i}": f"the value {i}" for i in range(6)}
    d = DOMAINS["mathematics"]
    _, plain = render(prog, d.templates, d.unit, names, random.Random(0))
    _, re1 = render(prog, d.templates, d.unit, names, random.Random(0), style="reordered", order_rng=random.Random(1))
    assert re1 != plain and re1.splitlines()[-1] == plain.splitlines()[-1]
    assert sorted(map(_body, re1.splitlines())) == sorted(map(_body, plain.splitlines()))
    assert [ln.split(":")[0] for ln in re1.splitlines()] == [ln.split(":")[0] for ln in plain.splitlines()]
    assert re1 == render(prog, d.templates, d.unit, names, random.Random(0), style="reordered",
                         order_rng=random.Random(1))[1]


def test_candidate_zero_is_the_row_and_candidates_are_deterministic(setup):
    params, teacher, seeds = setup
    rows = _rows(teacher, params, seeds[:10])
    for s, row in rows:
        c0 = teacher.sample(s, row, 0)
        assert c0 == {"sample": 0, "style": "plain", "flaw": row["flaw"], "cot_solution": row["cot_solution"],
                      "answer": row["answer"], "alignment_score": row["alignment_score"],
                      "step_count": row["step_count"], "error": None}
        for j in (1, 2, 3):
            c = teacher.sample(s, row, j)
            assert c == teacher.sample(s, row, j)
            assert c["sample"] == j and c["style"] in STYLES and c["error"] is None
            assert set(c) == set(c0)
    styles = {teacher.sample(s, row, j)["style"] for s, row in rows for j in (1, 2, 3)}
    assert styles == set(STYLES)


def test_candidates_without_flaws_are_exact():
    params, teacher, seeds = _teacher(**{"teacher.flaw_rate": 0.0})
    for s, row in _rows(teacher, params, seeds[:20]):
        for j in (1, 2, 3, 4):
            c = teacher.sample(s, row, j)
            assert c["flaw"] is None and c["alignment_score"] == 1.0
            assert c["answer"] == row["answer"] == s["answer"]
            assert c["cot_solution"].splitlines()[-1] == f"Answer: {s['answer']}"
            assert c["step_count"] == row["step_count"] == s["dag"]["step_count"]


def test_candidate_flaws_follow_the_flaw_model(setup):
    params, teacher, seeds = setup
    shift = {None: 0, "wrong_answer": 0, "broken_dependency": 0, "dropped_step": -1, "extra_step": 1}
    flaws = Counter()
    for s, row in _rows(teacher, params, seeds):
        for j in (1, 2):
            c = teacher.sample(s, row, j)
            flaws[c["flaw"]] += 1
            assert c["step_count"] == s["dag"]["step_count"] + shift[c["flaw"]]
            assert c["cot_solution"].splitlines()[-1] == f"Answer: {c['answer']}"
            if c["flaw"] == "wrong_answer":
                assert c["answer"] != teacher.draw(s, row["domain"], 1).program.answer()
            elif c["flaw"] != "broken_dependency" and row["flaw"] != "broken_dependency":  # the CoT's own wiring
                assert c["answer"] == s["answer"]
            if c["flaw"] == row["flaw"] == "broken_dependency":
                continue  # the candidate's broken dependency may happen to restore the seed's wiring
            if c["flaw"] in ("dropped_step", "extra_step", "broken_dependency") or row["flaw"] == "broken_dependency":
                assert c["alignment_score"] < 1.0  # a broken dependency of the row is in its problem
            else:
                assert c["alignment_score"] == 1.0
    rate = 1 - flaws[None] / sum(flaws.values())
    assert 0.1 < rate < 0.3  # teacher.flaw_rate 0.2
    assert set(flaws) == {None, "dropped_step", "extra_step", "broken_dependency", "wrong_answer"}


def test_step_verification_is_not_the_procedural_teachers(setup):
    params, teacher, seeds = setup
    with pytest.raises(NotImplementedError, match="step verifier"):
        teacher.verify_step(seeds[0], {"problem": "p"}, [], "Step 1: x.")
