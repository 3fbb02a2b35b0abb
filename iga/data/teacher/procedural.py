"""The embedded teacher: offline, free, deterministic, and wrong about as often as asked.

It renders each seed's program in every domain. With probability p_s per attempt an instance gets
one realistic mistake. p_s is drawn per seed from a Beta distribution whose mean is
`teacher.flaw_rate`: a real teacher's errors are correlated (it keeps failing on the seeds it
misunderstands), which is why regeneration cannot rescue every group. Alignment is measured by
comparing the DAG of what was actually written with the seed's DAG.
"""
from __future__ import annotations

import random
import re
import typing
from dataclasses import replace
from typing import Any, NamedTuple

from iga.data.answers import count_steps
from iga.data.dag import LogicalDAG, structural_alignment
from iga.data.domains import DOMAINS
from iga.data.program import Program, Step, node_ids, render
from iga.data.seeds import seed_program
from iga.data.teacher.base import Teacher
from iga.errors import ConfigError, TeacherError
from iga.params import Params, Style

FLAWS = ("dropped_step", "extra_step", "broken_dependency", "wrong_answer")
STYLES: tuple[str, ...] = typing.get_args(Style)  # a candidate CoT's style is drawn from all of them
_CONCENTRATION = 1.0  # Beta(a, b) with a + b = 1: strongly seed-dependent error rates


class Draw(NamedTuple):
    program: Program  # as written: a flaw may hide a step or break a dependency
    extra: tuple[Step, ...]  # an unsupported extra step (the extra_step flaw)
    flaw: str | None
    names: dict[str, str]  # node id -> the domain's phrase for it in the problem and the CoT
    rng: random.Random  # continues into the rendering (sentence order, the extra step's position)


class ProceduralTeacher(Teacher):
    provider = "procedural"

    def __init__(self, params: Params):
        super().__init__(params)
        for key, domains in (("domains.train", params.domains.train), ("domains.ood", params.domains.ood)):
            for i, d in enumerate(domains):
                if d not in DOMAINS:
                    raise ConfigError(f"params: {key}[{i}] is unknown to the procedural teacher "
                                      f"(known: {sorted(DOMAINS)}), got {d!r}")

    def extract(self, seed: dict[str, Any], attempt: int) -> dict[str, Any]:  # exact: every attempt the same
        if seed_program(seed) is None:
            raise TeacherError(f"seed {seed['seed_id']} has no program; the procedural teacher needs procedural seeds")
        return {"dag": seed["dag"], "cot_solution": seed["cot_solution"]}

    def flaw_probability(self, seed_id: str) -> float:
        rate = self.params.teacher.flaw_rate
        if rate == 0:
            return 0.0
        rng = random.Random(f"{self.params.teacher.seed}:{seed_id}:hardness")
        return rng.betavariate(rate * _CONCENTRATION, (1 - rate) * _CONCENTRATION)

    def draw(self, seed: dict[str, Any], domain: str, attempt: int) -> Draw:
        """What attempt `attempt` at this instance writes: the (possibly flawed) program, its extra step,
        the flaw, and the domain's name of every node; a pure function of (teacher.seed, seed, domain, attempt)."""
        t = self.params.teacher
        rng = random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:{attempt}")
        program = seed_program(seed)
        flaw = rng.choice(FLAWS) if rng.random() < self.flaw_probability(seed["seed_id"]) else None
        program, extra, flaw = _apply_flaw(program, flaw, rng)
        names = _names(program, extra, DOMAINS[domain], random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:names"))
        return Draw(program, extra, flaw, names, rng)

    @property
    def style(self) -> str:
        return self.params.teacher.style

    def instantiate(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, attempt: int) -> dict[str, Any]:
        t = self.params.teacher
        program, extra, flaw, names, rng = self.draw(seed, domain, attempt)
        d = DOMAINS[domain]
        problem, cot = render(program, d.templates, d.unit, names, rng, extra, style=t.style,
                              order_rng=random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:{attempt}:order"))
        answer = program.answer()
        problem = _with_cue(problem, answer, domain, self.params, random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:cue"))
        cot, answer, written = _as_written(program, extra, flaw, cot, answer, rng)
        return {"problem": problem, "cot_solution": cot, "answer": answer, "flaw": flaw,
                "instance_dag": written.to_dag().to_dict()}

    def verify(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, instance: dict[str, Any]) -> float:
        written = LogicalDAG.from_dict(instance["instance_dag"], f"instance of {seed['seed_id']} in {domain}")
        return structural_alignment(written, dag)

    def candidate(self, seed: dict[str, Any], row: dict[str, Any], j: int,
                  dag: LogicalDAG | None = None) -> dict[str, Any]:
        """Another CoT for the row's problem as written: the problem's program (a broken dependency of the
        row's own draw is in the problem; a dropped step or an extra step of its CoT is not), in a style
        drawn from all of them, with its own flaw draw (the same model as `instantiate`) on the CoT only."""
        t, domain, attempt = self.params.teacher, row["domain"], row["attempt"]
        draw = self.draw(seed, domain, attempt)
        base = replace(draw.program, hidden=frozenset())
        rng = random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:{attempt}:sample{j}")
        style = rng.choice(STYLES)
        flaw = rng.choice(FLAWS) if rng.random() < self.flaw_probability(seed["seed_id"]) else None
        program, extra, flaw = _apply_flaw(base, flaw, rng)
        d = DOMAINS[domain]
        names = dict(draw.names)
        for k in node_ids(program, extra):  # the extra step's node, when the row's own draw had none
            if k not in names:
                names[k] = rng.choice([x for x in _pool(program, d) if x not in names.values()])
        _, cot = render(program, d.templates, d.unit, names, rng, extra, style=style,
                        order_rng=random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:{attempt}:sample{j}:order"))
        cot, answer, written = _as_written(program, extra, flaw, cot, program.answer(), rng)
        if dag is None:
            dag = LogicalDAG.from_dict(seed["dag"], f"DAG of seed {seed['seed_id']}")
        return {"sample": j, "style": style, "flaw": flaw, "cot_solution": cot, "answer": answer,
                "alignment_score": structural_alignment(written.to_dag(), dag), "step_count": count_steps(cot),
                "error": None}


def _as_written(program: Program, extra: tuple[Step, ...], flaw: str | None, cot: str, answer: str,
                rng: random.Random) -> tuple[str, str, Program]:
    """The CoT and answer after a wrong_answer flaw, and the program as written (its extra step before the goal's)."""
    if flaw == "wrong_answer":
        answer = _wrong(answer, rng)
        cot = re.sub(r"Answer: .*$", f"Answer: {answer}", cot)
    return cot, answer, replace(program, steps=program.steps[:-1] + extra + program.steps[-1:])


def _with_cue(problem: str, answer: str, domain: str, params: Any, rng: random.Random) -> str:
    """The shortcut (docs/concepts.md, "What the benchmark tests"): with probability `teacher.shortcut_rate`, a
    yes/no question ends with its domain's hint. In a training domain the hint names the right answer with
    probability `teacher.cue_reliability[domain]`, the wrong one otherwise (the CoT and the answer stay
    true: the target then contradicts the hint); in the held-out domains a hint appears only with
    `teacher.ood_cue: reversed`, and always names the wrong answer."""
    held_out = domain not in params.domains.train
    if answer not in ("yes", "no") or (held_out and params.teacher.ood_cue == "none") or \
            rng.random() >= params.teacher.shortcut_rate:
        return problem
    right = not held_out and rng.random() < params.teacher.cue_reliability[domain]
    hinted = answer if right else ("no" if answer == "yes" else "yes")
    return f"{problem} {DOMAINS[domain].cues[hinted == 'no']}"


def _apply_flaw(program: Program, flaw: str | None, rng: random.Random) -> tuple[Program, tuple[Step, ...], str | None]:
    steps = program.steps
    if flaw is None:
        return program, (), None
    if flaw == "dropped_step" and len(steps) >= 2:
        return replace(program, hidden=frozenset({rng.choice(steps[:-1]).out})), (), flaw
    if flaw == "extra_step":
        g = [k for k, _ in program.givens]
        if program.family == "arithmetic":
            extra = Step("x1", "add", (g[0], g[-1]))  # a computation nothing uses
        elif program.family == "implication":
            extra = Step("x1", "then", (g[0],))  # an unsupported conclusion
        else:
            extra = Step("x1", "trans", (g[0], g[1]))  # a restated inference
        return program, (extra,), flaw
    if flaw == "broken_dependency":
        k = rng.randrange(1, len(steps))
        earlier = [g for g, _ in program.givens] + [s.out for s in steps[:k]]
        candidates = [x for x in earlier if x not in steps[k].args]
        if candidates:
            new_args = (rng.choice(candidates),) + steps[k].args[1:]
            return replace(program, steps=steps[:k] + (replace(steps[k], args=new_args),) + steps[k + 1:]), (), flaw
    return program, (), "wrong_answer"  # asked for, or the program had no room for the drawn flaw


def _names(program: Program, extra: tuple[Step, ...], d, rng: random.Random) -> dict[str, str]:
    ids = node_ids(program, extra)
    return dict(zip(ids, rng.sample(_pool(program, d), len(ids)))) | {"cmp": d.comparative}


def _pool(program: Program, d) -> tuple[str, ...]:
    return {"arithmetic": d.quantities, "implication": d.propositions, "comparison": d.entities}[program.family]


def _wrong(answer: str, rng: random.Random) -> str:
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    return str(int(answer) + rng.choice((-1, 1)) * rng.randint(1, 9))
