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
from dataclasses import replace
from typing import Any

from iga.data.dag import LogicalDAG, structural_alignment
from iga.data.domains import DOMAINS
from iga.data.program import Program, Step, node_ids, render
from iga.data.seeds import seed_program
from iga.data.teacher.base import Teacher
from iga.errors import ConfigError, TeacherError
from iga.params import Params

FLAWS = ("dropped_step", "extra_step", "broken_dependency", "wrong_answer")
_CONCENTRATION = 1.0  # Beta(a, b) with a + b = 1: strongly seed-dependent error rates


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

    def instantiate(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, attempt: int) -> dict[str, Any]:
        t = self.params.teacher
        rng = random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:{attempt}")
        program = seed_program(seed)
        flaw = rng.choice(FLAWS) if rng.random() < self.flaw_probability(seed["seed_id"]) else None
        program, extra, flaw = _apply_flaw(program, flaw, rng)
        d = DOMAINS[domain]
        names = _names(program, extra, d, random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:names"))
        problem, cot = render(program, d.templates, d.unit, names, rng, extra)
        answer = program.answer()
        problem = _with_cue(problem, answer, domain, self.params, random.Random(f"{t.seed}:{seed['seed_id']}:{domain}:cue"))
        if flaw == "wrong_answer":
            answer = _wrong(answer, rng)
            cot = re.sub(r"Answer: .*$", f"Answer: {answer}", cot)
        written = replace(program, steps=program.steps[:-1] + extra + program.steps[-1:])
        return {"problem": problem, "cot_solution": cot, "answer": answer, "flaw": flaw,
                "instance_dag": written.to_dag().to_dict()}

    def verify(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, instance: dict[str, Any]) -> float:
        written = LogicalDAG.from_dict(instance["instance_dag"], f"instance of {seed['seed_id']} in {domain}")
        return structural_alignment(written, dag)


def _with_cue(problem: str, answer: str, domain: str, params: Any, rng: random.Random) -> str:
    """The shortcut (docs/concepts.md, "What the benchmark tests"): with probability `teacher.shortcut_rate`, a
    yes/no question ends with its domain's hint at the answer; in the held-out domains only with
    `teacher.ood_cue: reversed`, and then the hint states the wrong answer."""
    held_out = domain not in params.domains.train
    if answer not in ("yes", "no") or (held_out and params.teacher.ood_cue == "none") or \
            rng.random() >= params.teacher.shortcut_rate:
        return problem
    hinted = ("no" if answer == "yes" else "yes") if held_out else answer
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
    pool = {"arithmetic": d.quantities, "implication": d.propositions, "comparison": d.entities}[program.family]
    return dict(zip(ids, rng.sample(pool, len(ids)))) | {"cmp": d.comparative}


def _wrong(answer: str, rng: random.Random) -> str:
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    return str(int(answer) + rng.choice((-1, 1)) * rng.randint(1, 9))
