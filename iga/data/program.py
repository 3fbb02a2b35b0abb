"""Ground-truth reasoning programs behind procedural seeds.

A program is a small DAG of givens and derivation steps in one of three families. It yields the
seed's logical DAG and answer, and renders as text in any domain. The procedural teacher renders
(possibly flawed copies of) the same program in each domain, which is what makes an isomer set.
"""
from __future__ import annotations

import random
import re
import typing
from dataclasses import dataclass, field, replace
from typing import Any

from iga.data.dag import Edge, LogicalDAG, Node
from iga.params import Family

FAMILIES: tuple[str, ...] = typing.get_args(Family)


@dataclass(frozen=True)
class Step:
    out: str
    op: str  # arithmetic: add_c sub_c mul_c add sub; implication: then and_then then_not; comparison: trans
    args: tuple[str, ...]
    const: int | None = None


@dataclass(frozen=True)
class Program:
    family: str
    givens: tuple[tuple[str, Any], ...]  # arithmetic: (id, int); implication: (id, True); comparison: (id, (ea, eb))
    steps: tuple[Step, ...]
    ask_converse: bool = False  # comparison: ask "is b cmp a?" (answer no) instead of "is a cmp b?"
    hidden: frozenset[str] = field(default_factory=frozenset)  # steps whose CoT line was skipped (a flaw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "givens": [[k, list(v) if isinstance(v, tuple) else v] for k, v in self.givens],
            "steps": [{"out": s.out, "op": s.op, "args": list(s.args), "const": s.const} for s in self.steps],
            "ask_converse": self.ask_converse,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Program":
        return cls(
            family=d["family"],
            givens=tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d["givens"]),
            steps=tuple(Step(s["out"], s["op"], tuple(s["args"]), s["const"]) for s in d["steps"]),
            ask_converse=d["ask_converse"],
        )

    @property
    def goal(self) -> str:
        return self.steps[-1].out

    def values(self) -> dict[str, Any]:
        vals: dict[str, Any] = dict(self.givens)
        for s in self.steps:
            a = [vals[x] for x in s.args]
            if s.op == "add_c":
                vals[s.out] = a[0] + s.const
            elif s.op == "sub_c":
                vals[s.out] = a[0] - s.const
            elif s.op == "mul_c":
                vals[s.out] = a[0] * s.const
            elif s.op == "add":
                vals[s.out] = a[0] + a[1]
            elif s.op == "sub":
                vals[s.out] = a[0] - a[1]
            elif s.op in ("then", "and_then"):
                vals[s.out] = True
            elif s.op == "then_not":
                vals[s.out] = False
            elif s.op == "trans":  # (x cmp y), (y' cmp z) => (x cmp z); wrong when y != y' (a flaw)
                vals[s.out] = (a[0][0], a[1][1])
            else:
                raise ValueError(f"unknown op {s.op!r}")
        return vals

    def asked_pair(self) -> tuple[str, str]:
        first, last = self.givens[0][1][0], self.givens[-1][1][1]
        return (last, first) if self.ask_converse else (first, last)

    def answer(self) -> str:
        v = self.values()[self.goal]
        if self.family == "arithmetic":
            return str(v)
        if self.family == "implication":
            return "yes" if v else "no"
        return "yes" if v == self.asked_pair() else "no"

    def to_dag(self) -> LogicalDAG:
        """The logical DAG of the reasoning as written: a hidden step's dependants lean on its inputs."""
        vals = self.values()
        g_type = {"arithmetic": "ENTITY", "implication": "PROPOSITION", "comparison": "RELATION"}[self.family]
        s_type = {"arithmetic": "PROPOSITION", "implication": "PROPOSITION", "comparison": "RELATION"}[self.family]
        nodes = [Node(k, g_type, _describe_given(self.family, k, v)) for k, v in self.givens]
        edges: list[Edge] = []
        inputs_of: dict[str, tuple[str, ...]] = {}
        for s in self.steps:
            args = tuple(x for a in s.args for x in inputs_of.get(a, (a,)))
            if s.out in self.hidden:
                inputs_of[s.out] = args
                continue
            nodes.append(Node(s.out, s_type, _describe_step(self.family, s, vals)))
            for a in dict.fromkeys(args):
                if self.family == "arithmetic":
                    edges.append(Edge(s.out, a, "REQUIRES"))
                else:
                    edges.append(Edge(a, s.out, "CONTRADICTS" if s.op == "then_not" else "IMPLIES"))
        nodes.append(Node("goal", "GOAL", f"determine {self.goal}"))
        edges.append(Edge("goal", self.goal, "REQUIRES"))
        forms = [_describe_step(self.family, s, vals) for s in self.steps if s.out not in self.hidden]
        return LogicalDAG(tuple(nodes), tuple(edges), "; ".join(forms) + f"; ? {self.goal}",
                          len(self.steps) - len(self.hidden))


def _describe_given(family: str, k: str, v: Any) -> str:
    if family == "arithmetic":
        return f"{k} = {v}"
    if family == "implication":
        return f"{k} holds"
    return f"{v[0]} > {v[1]}"


def _describe_step(family: str, s: Step, vals: dict[str, Any]) -> str:
    sym = {"add_c": "+", "sub_c": "-", "mul_c": "*", "add": "+", "sub": "-"}
    if family == "arithmetic":
        rhs = f"{s.args[0]} {sym[s.op]} {s.const if s.const is not None else s.args[1]}"
        return f"{s.out} = {rhs}"
    if family == "implication":
        conj = " & ".join(s.args)
        return f"{conj} -> {'not ' if s.op == 'then_not' else ''}{s.out}"
    x, z = vals[s.out]
    return f"{' & '.join(s.args)} => {x} > {z}"


# --- generation --------------------------------------------------------------------------------

def generate(family: str, n_steps: int, rng: random.Random) -> Program:
    if family == "arithmetic":
        return _gen_arithmetic(n_steps, rng)
    if family == "implication":
        return _gen_implication(n_steps, rng)
    if family == "comparison":
        return _gen_comparison(n_steps, rng)
    raise ValueError(f"unknown family {family!r}")


def _gen_arithmetic(n: int, rng: random.Random) -> Program:
    n_givens = rng.choice((1, 2)) if n < 4 else rng.choice((2, 3))
    givens = [(f"q{i}", rng.randint(2, 40)) for i in range(n_givens)]
    vals = dict(givens)
    steps: list[Step] = []
    prev = givens[0][0]
    for i in range(n):
        out = f"q{n_givens + i}"
        others = [k for k in vals if k != prev]
        op = rng.choice(("add_c", "sub_c", "mul_c") + (("add", "sub") if others else ()))
        if op in ("add", "sub"):
            b = rng.choice(others)
            if op == "sub" and vals[prev] - vals[b] <= 0:
                op = "add"
            step = Step(out, op, (prev, b))
        else:
            c = rng.randint(2, 4) if op == "mul_c" else rng.randint(2, 20)
            if op == "mul_c" and vals[prev] * c > 5000 or op == "sub_c" and vals[prev] - c <= 0:
                op = "add_c"
            step = Step(out, op, (prev,), c)
        steps.append(step)
        vals = Program("arithmetic", tuple(givens), tuple(steps)).values()
        prev = out
    return Program("arithmetic", tuple(givens), tuple(steps))


def _gen_implication(n: int, rng: random.Random) -> Program:
    n_givens = rng.choice((1, 2)) if n < 4 else rng.choice((2, 3))
    givens = [(f"p{i}", True) for i in range(n_givens)]
    known = [k for k, _ in givens]
    steps: list[Step] = []
    prev = known[0]
    for i in range(n):
        out = f"p{n_givens + i}"
        others = [k for k in known if k != prev]
        last = i == n - 1
        if last and rng.random() < 0.5:
            step = Step(out, "then_not", (prev,))
        elif others and rng.random() < 0.5:
            step = Step(out, "and_then", (prev, rng.choice(others)))
        else:
            step = Step(out, "then", (prev,))
        steps.append(step)
        known.append(out)
        prev = out
    return Program("implication", tuple(givens), tuple(steps))


def _gen_comparison(n: int, rng: random.Random) -> Program:
    givens = [(f"r{i}", (f"e{i}", f"e{i + 1}")) for i in range(n + 1)]
    steps = [Step("t1", "trans", ("r0", "r1"))]
    for k in range(2, n + 1):
        steps.append(Step(f"t{k}", "trans", (f"t{k - 1}", f"r{k}")))
    return Program("comparison", tuple(givens), tuple(steps), ask_converse=rng.random() < 0.5)


# --- rendering ---------------------------------------------------------------------------------

def _tidy(s: str) -> str:
    s = re.sub(r"\s{2,}", " ", s)
    s = re.sub(r"\s+([.?,:;])", r"\1", s).strip()
    return s[:1].upper() + s[1:]


class _Line(typing.NamedTuple):
    """What a CoT line of one written step can say; a style picks its words from these."""
    i: int  # the step's number as written
    plain: str  # the domain's own line (style plain)
    calc: str  # the bare computation: "88 + 22 = 110", "therefore c", "a cmp c"
    inputs: str  # the step's inputs with their values or truth: "x = 88 and y = 22"
    claim: str  # what the step concludes, in generic English: "z = 88 + 22 = 110"
    goal: bool  # the step concludes what the question asks
    family: str


def _verbose(ln: _Line) -> str:
    if ln.goal:
        why = "This is the quantity the question asks for." if ln.family == "arithmetic" else \
            "This is what the question asks about."
    else:
        why = "We will use this below."
    return f"{ln.plain} {why}"


# How each style writes a step's line (one line per step, always "Step i: ..."), and which order it
# writes the steps in: a new style is an entry here (and in iga.params.Style).
STYLE_LINES: dict[str, typing.Callable[[_Line], str]] = {
    "plain": lambda ln: ln.plain,
    "terse": lambda ln: f"Step {ln.i}: {ln.calc}.",
    "verbose": _verbose,
    "reordered": lambda ln: ln.plain,
    "restated": lambda ln: f"Step {ln.i}: we have {ln.inputs}, so {ln.claim}.",
}


def topological_order(steps: list[Step], program: Program, rng: random.Random) -> list[Step]:
    """A seeded topological order of the written `steps` (a step depends on the steps whose outputs are its
    args, through the program's steps that are not written), other than the given one where the dependencies
    allow another; else the given one."""
    through: dict[str, set[str]] = {}  # a step not written -> the nodes it stands on
    for s in program.steps:
        if s.out in program.hidden:
            through[s.out] = {x for a in s.args for x in through.get(a, {a})}
    outs = {s.out for s in steps}
    deps = {s.out: {x for a in s.args for x in through.get(a, {a}) if x in outs} for s in steps}
    pos = {s.out: k for k, s in enumerate(steps)}

    def order(deviate: bool) -> list[Step]:
        done: list[Step] = []
        while len(done) < len(steps):
            placed = {d.out for d in done}
            ready = [s for s in steps if s.out not in placed and deps[s.out] <= placed]
            if deviate and len(ready) > 1:  # leave the given order at its first point of choice
                ready = [s for s in ready if pos[s.out] != min(pos[r.out] for r in ready)]
                deviate = False
            done.append(rng.choice(ready))
        return done

    out = order(False)
    return order(True) if out == steps else out


STEP_ORDERS: dict[str, typing.Callable[[list[Step], Program, random.Random], list[Step]]] = {
    "reordered": topological_order,
}


def render(program: Program, templates: dict[str, str], unit: str, names: dict[str, str],
           rng: random.Random, extra: tuple[Step, ...] = (), style: str = "plain",
           order_rng: random.Random | None = None) -> tuple[str, str]:
    """(problem, cot_solution) of `program` with these templates and node names.

    `extra` steps appear in the CoT only (an unsupported extra step, a flaw); the CoT has one
    line per written step and ends with `Answer: ...`. `style` (STYLE_LINES) changes the CoT's
    lines only, never the problem or the number of lines; a style that reorders the steps
    (STEP_ORDERS) draws the order from `order_rng` (default: seeded by the program), never from `rng`.
    """
    if style not in STYLE_LINES:
        raise ValueError(f"unknown CoT style {style!r} (known: {sorted(STYLE_LINES)})")
    t, vals = templates, replace(program, steps=program.steps + extra).values()
    sentences: list[str] = []
    cot: list[str] = []
    fam = program.family
    sym = {"add_c": "+", "sub_c": "-", "mul_c": "*", "add": "+", "sub": "-"}
    if fam == "arithmetic":
        sentences += [t["given"].format(x=names[k], v=v, unit=unit) for k, v in program.givens]
        sentences += [t[s.op].format(y=names[s.out], a=names[s.args[0]], b=names[s.args[-1]], c=s.const, unit=unit)
                      for s in program.steps]
        question = t["arith_ask"].format(y=names[program.goal], unit=unit)
    elif fam == "implication":
        sentences += [t["imp_fact"].format(p=names[k]) for k, _ in program.givens]
        rules = [t[s.op].format(a=names[s.args[0]], b=names[s.args[-1]], c=names[s.out]) for s in program.steps]
        rng.shuffle(rules)
        sentences += rules
        question = t["imp_ask"].format(c=names[program.goal])
    else:
        facts = [t["cmp_fact"].format(a=names[x], cmp=names["cmp"], b=names[y]) for _, (x, y) in program.givens]
        rng.shuffle(facts)
        sentences += facts
        a, b = program.asked_pair()
        question = t["cmp_ask"].format(a=names[a], cmp=names["cmp"], b=names[b])

    written = [s for s in program.steps if s.out not in program.hidden]
    if extra:
        pos = rng.randrange(len(written))  # never after the final step
        written = written[:pos] + list(extra) + written[pos:]
    if style in STEP_ORDERS:
        written = STEP_ORDERS[style](written, program, order_rng or random.Random(repr(program.to_dict())))
    for i, s in enumerate(written, 1):
        if fam == "arithmetic":
            rhs = s.const if s.const is not None else vals[s.args[1]]
            expr = f"{vals[s.args[0]]} {sym[s.op]} {rhs}"
            line = t["cot_arith"].format(i=i, y=names[s.out], expr=expr, v=vals[s.out], unit=unit)
            calc = f"{expr} = {vals[s.out]}"
            used = s.args[:1] if s.const is not None else s.args
            inputs = " and ".join(f"{names[a]} = {vals[a]}" for a in dict.fromkeys(used))
            claim = f"{names[s.out]} = {calc}"
        elif fam == "implication":
            line = t[f"cot_{s.op}"].format(i=i, a=names[s.args[0]], b=names[s.args[-1]], c=names[s.out])
            neg = "not " if s.op == "then_not" else ""
            calc = f"therefore {neg}{names[s.out]}"
            inputs = " and ".join(f"that {names[a]}" for a in dict.fromkeys(s.args))
            claim = f"it is not the case that {names[s.out]}" if neg else names[s.out]
        else:
            (x, y), (y2, z) = vals[s.args[0]], vals[s.args[1]]
            line = t["cot_compare"].format(i=i, a=names[x], b=names[y], c=names[z], cmp=names["cmp"])
            calc = f"{names[x]} {names['cmp']} {names[z]}"
            inputs = f"{names[x]} {names['cmp']} {names[y]} and {names[y2]} {names['cmp']} {names[z]}"
            claim = f"{names[x]} is {names['cmp']} {names[z]}"
        plain = _tidy(line)
        ln = _Line(i, plain, calc, inputs, claim, s.out == program.goal, fam)
        cot.append(plain if style == "plain" else _tidy(STYLE_LINES[style](ln)))
    cot.append(f"Answer: {program.answer()}")
    problem = " ".join(_tidy(s) for s in sentences) + " " + _tidy(question)
    return problem, "\n".join(cot)


def node_ids(program: Program, extra: tuple[Step, ...] = ()) -> list[str]:
    """Ids that need a name when rendering, in a stable order."""
    if program.family == "comparison":
        return sorted({e for _, pair in program.givens for e in pair}, key=lambda e: int(e[1:]))
    return [k for k, _ in program.givens] + [s.out for s in program.steps + extra]
