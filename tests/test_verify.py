"""The step verifier: exact validity of a proposed next CoT line for procedural seeds (iga.data.verify)."""
from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest

from iga.data.dag import LogicalDAG
from iga.data.domains import DOMAINS
from iga.data.program import Step, render
from iga.data.seeds import procedural_seeds
from iga.data.teacher.procedural import STYLES, ProceduralTeacher
from iga.data.verify import (
    ProgramVerifier,
    StepVerifier,
    TeacherStepVerifier,
    _Context,
    make_verifier,
)
from iga.params import load_params


def _setup(flaw_rate: float = 0.0, style: str = "plain", n: int = 12):
    params = load_params(overrides={"teacher.flaw_rate": flaw_rate, "teacher.style": style, "seeds.n": n})
    seeds = procedural_seeds(params.seeds)
    return params, seeds, ProceduralTeacher(params), ProgramVerifier(params, {s["seed_id"]: s for s in seeds})


def _rows(params, seeds, teacher):
    for seed in seeds:
        for domain in params.domains.all:
            inst = teacher.instantiate(seed, LogicalDAG.from_dict(seed["dag"], "x"), domain, 1)
            yield seed, {"seed_id": seed["seed_id"], "domain": domain, "attempt": 1, "problem": inst["problem"],
                         "cot_solution": inst["cot_solution"], "answer": inst["answer"], "flaw": inst["flaw"]}


def _scores(ver: StepVerifier, row: dict, lines: list[str]) -> list[float]:
    return ver.verify_many([(row, lines[:i], ln) for i, ln in enumerate(lines)])


@pytest.fixture(scope="module")
def clean():
    params, seeds, teacher, ver = _setup()
    return params, seeds, teacher, ver, list(_rows(params, seeds, teacher))


@pytest.mark.parametrize("style", STYLES)
def test_every_line_of_a_clean_cot_is_valid(style):
    params, seeds, teacher, ver = _setup(style=style)
    families, domains = set(), set()
    for seed, row in _rows(params, seeds, teacher):
        lines = row["cot_solution"].splitlines()
        assert _scores(ver, row, lines) == [1.0] * len(lines), (style, row["domain"], lines)
        families.add(seed["family"])
        domains.add(row["domain"])
    assert families == {"arithmetic", "implication", "comparison"} and domains == set(params.domains.all)


def test_wrong_values_and_answers_score_zero(clean):
    *_, ver, rows = clean
    for seed, row in rows:
        lines = row["cot_solution"].splitlines()
        answer = lines[-1].removeprefix("Answer: ")
        wrong = str(int(answer) + 7) if seed["family"] == "arithmetic" else {"yes": "no", "no": "yes"}[answer]
        assert ver.verify(row, lines[:-1], f"Answer: {wrong}") == 0.0
        assert ver.verify(row, lines[:-1], f"answer: {answer}.") == 1.0
        if seed["family"] == "arithmetic":
            for i, ln in enumerate(lines[:-1]):
                last = list(re.finditer(r"\d+", ln))[-1]  # the value: the last number on the line
                edited = ln[:last.start()] + str(int(last.group()) + 1) + ln[last.end():]
                assert ver.verify(row, lines[:i], edited) == 0.0, edited


def test_skipping_a_step_scores_half_and_repeating_scores_zero(clean):
    *_, ver, rows = clean
    for _, row in rows:
        lines = row["cot_solution"].splitlines()
        assert ver.verify(row, [], lines[1]) == 0.5, lines  # step 2 before step 1: true, but a leap
        assert ver.verify(row, lines[:2], lines[1]) == 0.0  # said already: nothing new
        assert ver.verify(row, lines[:1] + [lines[2]], lines[1]) == 1.0  # written late: still valid


def test_noise_givens_and_foreign_phrases_score_zero(clean):
    *_, ver, rows = clean
    for seed, row in rows:
        lines = row["cot_solution"].splitlines()
        ctx = ver.context(row)
        for noise in ("", "   ", "Step 1: the weather is nice today.", "lorem ipsum 42", "Step 3:"):
            assert ver.verify(row, lines[:1], noise) == 0.0
        g, v = ctx.program.givens[0]
        if seed["family"] == "arithmetic":
            restated = f"Step 1: {ctx.names[g]} = {v}."
        elif seed["family"] == "implication":
            restated = f"Step 1: therefore {ctx.names[g]}."
        else:
            restated = f"Step 1: {ctx.names[v[0]]} {ctx.names['cmp']} {ctx.names[v[1]]}."
        assert ver.verify(row, [], restated) == 0.0
        pool = {"arithmetic": "quantities", "implication": "propositions", "comparison": "entities"}[seed["family"]]
        foreign = next(x for x in getattr(DOMAINS[row["domain"]], pool) if x not in ctx.names.values())
        assert ver.verify(row, [], f"{lines[0]} Also, {foreign}.") == 0.0


def _ctx_and_row(clean, family: str, domain: str = "mathematics"):
    *_, ver, rows = clean
    _, row = next((s, r) for s, r in rows if s["family"] == family and r["domain"] == domain)
    return ver, row, ver.context(row)


def test_arithmetic_phrasings(clean):
    ver, row, ctx = _ctx_and_row(clean, "arithmetic")
    s1, s2 = ctx.program.steps[:2]
    n, val = ctx.names, ctx.values
    sym = {"add_c": "+", "add": "+", "sub_c": "-", "sub": "-", "mul_c": "*"}[s2.op]
    a, b = val[s2.args[0]], s2.const if s2.const is not None else val[s2.args[1]]
    expr, y = f"{a} {sym} {b}", n[s2.out].capitalize()
    prefix = [f"Step 1: {n[s1.out]} = {val[s1.out]}."]
    for line, v in [
        (f"Step 2: {n[s2.out]} = {expr} = {val[s2.out]}.", 1.0),
        (f"{y} = {expr} = {val[s2.out]}", 1.0),  # no "Step k:", capitalised
        (f"Step 2: {expr} = {val[s2.out]}.", 1.0),  # terse, no name
        (f"Step 2: {n[s2.out]} is {val[s2.out]}.", 1.0),  # a value without its computation
        (f"Step 2: {n[s2.out]} = {val[s2.out]} (that is, {expr}), as step 3 will need.", 1.0),
        ((f"Step 2: we have {n[s2.args[0]]} = {a}, so {n[s2.out]} = {expr} = {val[s2.out]} units. This is "
          f"needed below."), 1.0),
        (f"Step 2: {n[s2.out]} = {a} {sym} {b + 1} = {val[s2.out]}.", 0.0),  # wrong operands
        (f"Step 2: {n[s2.out]} = {expr} = {val[s2.out] + 1}.", 0.0),  # wrong value
        (f"Step 2: {n[s2.out]} = {expr}.", 0.0),  # no value stated
        (f"Step 2: {expr} = {val[s2.out] - 1}.", 0.0),
        (f"Step 2: {n[s2.out]} = {val[s1.out]}.", 0.0),  # a value of another quantity
    ]:
        assert ver.verify(row, prefix, line) == v, line
    if sym == "+":
        assert ver.verify(row, prefix, f"Step 2: {n[s2.out]} = {b} + {a} = {val[s2.out]}.") == 1.0  # commutes


def test_implication_polarity_and_citations(clean):
    *_, ver, rows = clean
    seen = set()
    for seed, row in rows:
        if seed["family"] != "implication":
            continue
        ctx = ver.context(row)
        n, steps, givens = ctx.names, ctx.program.steps, [k for k, _ in ctx.program.givens]
        known = [f"Step {i}: therefore {'not ' if s.op == 'then_not' else ''}{n[s.out]}." for i, s in enumerate(steps, 1)]
        last = steps[-1]
        neg = last.op == "then_not"
        seen.add(neg)
        right, wrong = (f"it is not the case that {n[last.out]}", n[last.out])[:: 1 if neg else -1]
        assert ver.verify(row, known[:-1], f"Therefore {right}.") == 1.0
        assert ver.verify(row, known[:-1], f"Therefore {wrong}.") == 0.0  # the wrong polarity
        premises = " and ".join(n[a] for a in last.args)
        assert ver.verify(row, known[:-1], f"Since {premises}, {right}.") == 1.0
        other = next((k for k in givens + [s.out for s in steps[:-1]] if k not in last.args), None)
        if other is not None:  # a rule that is not the problem's
            assert ver.verify(row, known[:-1], f"Since {n[other]}, {right}.") == 0.0
    assert seen == {True, False}


def test_comparison_chains(clean):
    ver, row, ctx = _ctx_and_row(clean, "comparison", "medical")
    n, c = ctx.names, ctx.names["cmp"]
    e = sorted({x for _, p in ctx.program.givens for x in p}, key=lambda k: int(k[1:]))
    assert ver.verify(row, [], f"{n[e[0]]} is {c} {n[e[2]]}.") == 1.0  # one step over the facts
    assert ver.verify(row, [], f"{n[e[0]]} is {c} {n[e[3]]}.") == 0.5  # true, but skips e0 > e2
    assert ver.verify(row, [f"{n[e[0]]} is {c} {n[e[2]]}."], f"{n[e[0]]} is {c} {n[e[3]]}.") == 1.0
    assert ver.verify(row, [], f"{n[e[2]]} is {c} {n[e[0]]}.") == 0.0  # false
    assert ver.verify(row, [], f"{n[e[0]]} is not {c} {n[e[2]]}.") == 0.0
    assert ver.verify(row, [], f"{n[e[1]]} {c} {n[e[2]]} and {n[e[2]]} {c} {n[e[3]]}, "
                               f"so {n[e[1]]} {c} {n[e[3]]}.") == 1.0
    assert ver.verify(row, [], f"{n[e[0]]} {c} {n[e[2]]} and {n[e[2]]} {c} {n[e[3]]}, "
                               f"so {n[e[0]]} {c} {n[e[3]]}.") == 0.5  # cites e0 > e2, not yet known
    assert ver.verify(row, [], f"{n[e[0]]} {c} {n[e[1]]} and {n[e[2]]} {c} {n[e[1]]}, "
                               f"so {n[e[0]]} {c} {n[e[2]]}.") == 0.0  # cites a false relation


def test_longest_phrase_wins():
    _, seeds, _, ver = _setup(n=3)
    seed = next(s for s in seeds if s["family"] == "arithmetic")
    ctx = ver.context({"seed_id": seed["seed_id"], "domain": "medical", "attempt": 1})
    q = [k for k, _ in ctx.program.givens] + [s.out for s in ctx.program.steps]
    names = dict(ctx.names) | {q[0]: "the dose", q[1]: "the dose limit"}
    sub = _Context(ctx.program, names, "medical")
    assert [k for *_, k in sub.mentions("The dose limit exceeds the dose.")] == [q[1], q[0]]


def test_flawed_teacher_lines_score_below_one():
    params, seeds, teacher, ver = _setup(flaw_rate=0.95, n=30)
    flaws = set()
    for seed, row in _rows(params, seeds, teacher):
        lines = row["cot_solution"].splitlines()
        scores = _scores(ver, row, lines)
        flaws.add(row["flaw"])
        if row["flaw"] in ("dropped_step", "extra_step", "wrong_answer"):
            assert min(scores) < 1.0, (row["flaw"], lines, scores)
        if row["flaw"] == "dropped_step":
            assert 0.5 in scores
        if row["flaw"] == "wrong_answer":
            assert scores[-1] == 0.0
        if row["flaw"] == "broken_dependency" and seed["family"] != "comparison":
            assert min(scores) == 1.0  # the flaw is in the problem itself, which the CoT solves
    assert {"dropped_step", "extra_step", "broken_dependency", "wrong_answer"} <= flaws


def _cot(ctx, program, domain: str, extra=()) -> list[str]:
    """The CoT lines of `program` written with the row's names (an extra step gets a phrase not in the problem)."""
    d, names = DOMAINS[domain], dict(ctx.names)
    if extra and program.family != "comparison":
        pool = d.quantities if program.family == "arithmetic" else d.propositions
        names["x1"] = next(x for x in pool if x not in names.values())
    return render(program, d.templates, d.unit, names, random.Random(0), extra)[1].splitlines()


def test_cots_of_flawed_programs_against_the_clean_problem(clean):
    *_, ver, rows = clean
    for _, row in rows:
        ctx = ver.context(row)
        p = ctx.program
        steps, g = p.steps, [k for k, _ in p.givens]

        def cot(program, extra=(), ctx=ctx, domain=row["domain"]):
            return _cot(ctx, program, domain, extra)

        clean_lines = cot(p)
        # dropped step: the line after it leaps
        dropped = cot(replace(p, hidden=frozenset({steps[0].out})))
        assert _scores(ver, row, dropped)[0] == 0.5
        # extra step: an unsupported computation or conclusion, or a repeated inference
        if p.family == "arithmetic":
            extra = Step("x1", "add", (g[0], g[-1]))
        elif p.family == "implication":
            extra = Step("x1", "then", (g[0],))
        else:
            extra = Step("x1", "trans", (g[0], g[1]))
        assert min(_scores(ver, row, cot(p, (extra,)))) < 1.0
        # broken dependency, written against the problem as posed
        for k in range(1, len(steps)):
            earlier = g + [s.out for s in steps[:k]]
            for cand in (x for x in earlier if x not in steps[k].args):
                broken = replace(p, steps=steps[:k] + (replace(steps[k], args=(cand,) + steps[k].args[1:]),)
                                 + steps[k + 1:])
                lines = cot(broken)
                vals = broken.values()
                sound = p.family == "comparison" and vals[cand][1] == vals[steps[k].args[1]][0]  # a fresh chain
                if lines[:-1] != clean_lines[:-1] and not sound:
                    assert min(_scores(ver, row, lines)) < 1.0, (lines, clean_lines)


def test_make_verifier_and_the_teacher_verifier(clean):
    params, seeds, teacher, _, rows = clean
    assert isinstance(make_verifier(params, seeds, teacher), ProgramVerifier)

    class Stub:
        provider = "openai"

        def __init__(self):
            self.calls, self.mapped = [], 0

        def verify_step(self, seed, row, prefix, line):
            self.calls.append((seed["seed_id"], row["seed_id"], tuple(prefix), line))
            return 1.5 if line == "big" else 0.25

        def map(self, fn, items):
            self.mapped += 1
            return [fn(x) for x in items]

    stub = Stub()
    ver = make_verifier(params, {s["seed_id"]: s for s in seeds}, stub)
    assert isinstance(ver, TeacherStepVerifier)
    _, row = rows[0]
    assert ver.verify_many([(row, [], "a"), (row, ["a"], "big")]) == [0.25, 1.0]
    assert stub.mapped == 1
    assert stub.calls == [(row["seed_id"], row["seed_id"], (), "a"), (row["seed_id"], row["seed_id"], ("a",), "big")]
