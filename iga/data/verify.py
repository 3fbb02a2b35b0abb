"""Step verification: how valid a proposed next CoT line is, given the problem and the lines so far.

A `StepVerifier` returns the local validity v in [0, 1] of `line` as the next line of a training
row's CoT after the lines `prefix`. For procedural seeds `ProgramVerifier` computes it exactly from
the program behind the row's problem (`ProceduralTeacher.draw` with its hidden steps shown again: a
broken_dependency flaw changes the problem itself, a dropped or an extra step only the CoT); any
other teacher is asked (`TeacherStepVerifier`, through `teacher.verify_step`).

Validity (the project's definition)
-----------------------------------
A line is read without its "Step k:" (or "k." / bullet) prefix. Domain phrases are matched
case-insensitively, the longest phrase first, so a phrase never matches inside a longer one. The
*known* facts are the problem's givens plus everything established by the prefix: the prefix is
judged line by line with these same rules, and a line with v >= 0.5 establishes what it concludes
(it is true and on the page; only the line that leapt is penalised). Answer lines and blank lines
of the prefix establish nothing.

v = 1.0 -- the line states a new fact that follows from the problem and the known facts:
  arithmetic   it names a derived quantity of the program (a step's output) that is not yet known,
               or, naming none, writes a computation ``a op b`` whose operator and operand values
               are a step's, and states the quantity's correct value; the step's inputs are known.
  implication  it concludes a step's proposition, not yet known, with the step's polarity ("not",
               "rule out", "cannot", "excludes", ... for then_not; none of them otherwise); the
               step's premises are known; if the line cites premises at all, it cites every
               premise of the step's rule.
  comparison   it concludes "x cmp z" for a pair implied by the given facts (transitively), not yet
               known, which one transitive step over known relations yields; every relation the
               line cites besides its conclusion is known.
  answer       "Answer: X" is 1.0 iff X, normalised (iga.data.answers), equals the problem's answer
               (comparison: "yes" iff the asked pair is implied by the facts); else 0.0.
v = 0.5 -- a true statement with the right value that leaps: the step's inputs or premises (or, in
  comparison, a relation the line cites or the one-step derivation) are true but not yet known.
v = 0.0 -- anything else: a wrong value or computation, a wrong polarity, a conclusion that does not
  follow (a cited rule that is not the step's, a false comparison, a negated comparison), a domain
  phrase that is not in the problem (the extra_step flaw's node), a restatement of a given or of an
  already established fact with no new inference, or a line that cannot be parsed.

Which quantity or proposition a line concludes: the deepest (latest in the program's step order)
mentioned step output that is not yet known -- inputs that a verbose line restates come earlier in
the program. The value an arithmetic line claims: first every computation ``a op b`` (op one of
+ - * × · or plus/minus/times/multiplied by) is taken out, and numbers right after "step" are
ignored; the claimed value is the last number left on the line ("x = 88 + 22 = 110 mg" -> 110,
"x = 110 (88 + 22)" -> 110). A comparison line's relations are the pairs of consecutive entity
mentions with the comparative phrase (or a bare ">") between them; its conclusion is the relation
composed of two others on the line, else the only one, else the last one not yet known.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

from iga.data.answers import answer_text, normalize_answer
from iga.data.domains import DOMAINS
from iga.data.program import Program, Step, node_ids
from iga.data.seeds import seed_program
from iga.errors import DataError
from iga.params import Params

Item = tuple[dict, list[str], str]


class StepVerifier(ABC):
    """The local validity of a proposed next CoT line (module docstring)."""

    @abstractmethod
    def verify(self, row: dict, prefix: list[str], line: str) -> float:
        """v in [0, 1] of `line` as the next line after `prefix` of the CoT of training row `row`."""

    def verify_many(self, items: list[Item]) -> list[float]:
        """`verify` over (row, prefix, line) items; a remote verifier makes the calls concurrently."""
        return [self.verify(row, prefix, line) for row, prefix, line in items]


class TeacherStepVerifier(StepVerifier):
    """Asks the teacher: `teacher.verify_step(seed, row, prefix, line)`, many at once through `teacher.map`."""

    def __init__(self, teacher: Any, seeds: dict[str, dict]):
        self.teacher = teacher
        self.seeds = _by_id(seeds)

    def verify(self, row: dict, prefix: list[str], line: str) -> float:
        v = float(self.teacher.verify_step(_seed(self.seeds, row), row, list(prefix), line))
        return min(1.0, max(0.0, v))

    def verify_many(self, items: list[Item]) -> list[float]:
        return self.teacher.map(lambda item: self.verify(*item), list(items))


class ProgramVerifier(StepVerifier):
    """Exact validity for procedural seeds, from the program behind each row's problem."""

    def __init__(self, params: Params, seeds: dict[str, dict]):
        from iga.data.teacher.procedural import ProceduralTeacher

        self.teacher = ProceduralTeacher(params)
        self.seeds = _by_id(seeds)
        self._contexts: dict[tuple[str, str, int], _Context] = {}

    def verify(self, row: dict, prefix: list[str], line: str) -> float:
        ctx = self.context(row)
        known: set = set()
        for earlier in prefix:
            v, fact = ctx.judge(earlier, known)
            if v >= 0.5 and fact is not None:
                known.add(fact)
        return ctx.judge(line, known)[0]

    def context(self, row: dict) -> _Context:
        key = (row["seed_id"], row["domain"], int(row.get("attempt") or 1))
        if key not in self._contexts:
            seed = _seed(self.seeds, row)
            if seed_program(seed) is None:
                raise DataError(f"seed {seed['seed_id']} has no program: ProgramVerifier needs procedural seeds")
            draw = self.teacher.draw(seed, key[1], key[2])
            self._contexts[key] = _Context(replace(draw.program, hidden=frozenset()), draw.names, key[1])
        return self._contexts[key]


def make_verifier(params: Params, seeds: dict[str, dict] | list[dict], teacher: Any) -> StepVerifier:
    """The exact ProgramVerifier for the procedural teacher, else the teacher's own judgement."""
    if getattr(teacher, "provider", None) == "procedural":
        return ProgramVerifier(params, seeds)
    return TeacherStepVerifier(teacher, seeds)


def _by_id(seeds: dict[str, dict] | list[dict]) -> dict[str, dict]:
    return dict(seeds) if isinstance(seeds, dict) else {s["seed_id"]: s for s in seeds}


def _seed(seeds: dict[str, dict], row: dict) -> dict:
    try:
        return seeds[row["seed_id"]]
    except KeyError:
        raise DataError(f"step verifier: no seed {row['seed_id']!r} among the {len(seeds)} seeds given") from None


# --- parsing -----------------------------------------------------------------------------------

_PREFIX = re.compile(r"^\s*(?:[-*•]\s+)?(?:step\s*\d+\s*[:.)\-]?\s*|\d+[.)]\s+)?", re.IGNORECASE)
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_OPS = {"+": "+", "plus": "+", "-": "-", "−": "-", "–": "-", "minus": "-",
        "*": "*", "×": "*", "·": "*", "times": "*", "multiplied by": "*"}
_EXPR = re.compile(rf"(?<![\w.])({_NUM})\s*(\+|-|−|–|\*|×|·|\bplus\b|\bminus\b|\btimes\b|\bmultiplied by\b)\s*({_NUM})(?![\d])",
                   re.IGNORECASE)
_NUMBER = re.compile(rf"(?<![\w.])(-?)({_NUM})(?!\d)")
_STEP_REF = re.compile(r"\bsteps?\s+\d+", re.IGNORECASE)
_NEGATION = re.compile(r"\bnot\b|n't\b|\bno longer\b|\brul(?:e|es|ed|ing) out\b|\bcannot\b|\bexclud(?:e|es|ed|ing)\b"
                       r"|\bnever\b|\bfalse\b|\bimpossible\b", re.IGNORECASE)
_SYM = {"add_c": "+", "add": "+", "sub_c": "-", "sub": "-", "mul_c": "*"}
_MASK = " § "


def _strip(line: str) -> str:
    return _PREFIX.sub("", line, count=1).strip()


def _num(s: str) -> float:
    return float(s.replace(",", ""))


@dataclass
class _Context:
    """One row's problem: its program, the domain phrase of each node, and what follows from them."""
    program: Program
    names: dict[str, str]
    domain: str

    def __post_init__(self) -> None:
        p = self.program
        self.values = p.values()
        self.givens = {k for k, _ in p.givens}
        self.step_of = {s.out: s for s in p.steps}
        self.depth = {s.out: k for k, s in enumerate(p.steps)}
        d = DOMAINS[self.domain]
        pool = {"arithmetic": d.quantities, "implication": d.propositions, "comparison": d.entities}[p.family]
        ids = node_ids(p)
        phrases: dict[str, str | None] = {x.lower(): None for x in pool}
        phrases |= {n.lower(): None for k, n in self.names.items() if k != "cmp"}
        phrases |= {self.names[k].lower(): k for k in ids}  # None: a phrase that is not in this problem
        self.phrases = [(re.compile(rf"(?<!\w){re.escape(x)}(?!\w)"), k)
                        for x, k in sorted(phrases.items(), key=lambda kv: -len(kv[0]))]
        self.cmp = self.names.get("cmp", d.comparative).lower()
        if p.family == "comparison":
            self.facts = {pair for _, pair in p.givens}
            self.closure = _closure(self.facts)
            a, b = p.asked_pair()
            self.answer = "yes" if (a, b) in self.closure else "no"
        else:
            self.answer = p.answer()

    # Each judge returns (v, the fact the line establishes or None).
    def judge(self, line: str, known: set) -> tuple[float, Any]:
        text = _strip(line)
        if not text:
            return 0.0, None
        raw = answer_text(text)
        if raw is not None:
            return (1.0 if normalize_answer(raw) == self.answer else 0.0), None
        mentions = self.mentions(text)
        if any(k is None for _, _, k in mentions):
            return 0.0, None  # a quantity, clause or entity that is not in the problem
        judge = {"arithmetic": self._arithmetic, "implication": self._implication,
                 "comparison": self._comparison}[self.program.family]
        return judge(text, mentions, known)

    def mentions(self, text: str) -> list[tuple[int, int, str | None]]:
        """(start, end, node id or None) of every domain phrase in `text`, longest phrases first, in order."""
        low, taken, found = text.lower(), [False] * len(text), []
        for pattern, k in self.phrases:
            for m in pattern.finditer(low):
                if not any(taken[m.start():m.end()]):
                    taken[m.start():m.end()] = [True] * (m.end() - m.start())
                    found.append((m.start(), m.end(), k))
        return sorted(found)

    def _new_conclusion(self, mentions, known: set) -> str | None:
        """The deepest mentioned step output that is not yet known."""
        new = [k for _, _, k in mentions if k in self.step_of and k not in known]
        return max(new, key=self.depth.__getitem__) if new else None

    def _known(self, k: str, known: set) -> bool:
        return k in self.givens or k in known

    def _arithmetic(self, text: str, mentions, known: set) -> tuple[float, Any]:
        masked = _masked(text, mentions)
        masked = _STEP_REF.sub(_MASK, masked)
        exprs = [(_OPS[m.group(2).lower()], _num(m.group(1)), _num(m.group(3))) for m in _EXPR.finditer(masked)]
        rest = _EXPR.sub(_MASK, masked)
        numbers = [(-1 if m.group(1) else 1) * _num(m.group(2)) for m in _NUMBER.finditer(rest)]
        if not numbers:
            return 0.0, None  # no value stated
        claimed = numbers[-1]
        target = self._new_conclusion(mentions, known)
        if target is not None:
            step = self.step_of[target]
            if claimed != self.values[target] or exprs and not any(self._computes(step, e) for e in exprs):
                return 0.0, None
            return self._inputs_known(step, known), target
        # No new quantity named: the step whose computation the line writes, with its value.
        steps = [s for s in self.program.steps if s.out not in known and self.values[s.out] == claimed
                 and any(self._computes(s, e) for e in exprs)]
        if not steps:
            return 0.0, None
        best = max(steps, key=lambda s: self._inputs_known(s, known))
        return self._inputs_known(best, known), best.out

    def _computes(self, step: Step, expr: tuple[str, float, float]) -> bool:
        op, a, b = expr
        x = self.values[step.args[0]]
        y = step.const if step.const is not None else self.values[step.args[1]]
        return op == _SYM[step.op] and ((a, b) == (x, y) or op != "-" and (a, b) == (y, x))

    def _inputs_known(self, step: Step, known: set) -> float:
        inputs = step.args[:1] if step.const is not None else step.args
        return 1.0 if all(self._known(a, known) for a in inputs) else 0.5

    def _implication(self, text: str, mentions, known: set) -> tuple[float, Any]:
        target = self._new_conclusion(mentions, known)
        if target is None:
            return 0.0, None  # nothing new: a restatement of givens or of what the prefix established
        step = self.step_of[target]
        negated = bool(_NEGATION.search(_masked(text, mentions)))
        if negated != (step.op == "then_not"):
            return 0.0, None  # the wrong polarity
        cited = {k for _, _, k in mentions} - {target}
        if cited and not set(step.args) <= cited:
            return 0.0, None  # the rule the line cites is not the step's
        if any(self.values.get(k) is False for k in cited):
            return 0.0, None  # a premise that is false
        v = 1.0 if all(self._known(k, known) for k in cited | set(step.args)) else 0.5
        return v, target

    def _comparison(self, text: str, mentions, known: set) -> tuple[float, Any]:
        rels = []
        for (_, e1, x), (s2, _, z) in pairwise(mentions):
            between = text[e1:s2].lower()
            if self.cmp in between or re.search(r"(?<![=\-])>", between):
                if re.search(r"\bnot\b|n't\b|\bnever\b", between):
                    return 0.0, None  # a negated comparison: not a conclusion of this problem
                rels.append((x, z))
        rels = list(dict.fromkeys(rels))
        if not rels:
            return 0.0, None
        have = self.facts | known
        composed = [(x, z) for x, z in rels if any((x, y) in rels and (y, z) in rels for _, y in rels)]
        if composed:
            concl = composed[-1]
        elif len(rels) == 1:
            concl = rels[0]
        else:
            new = [r for r in rels if r not in have]
            concl = new[-1] if new else rels[-1]
        if concl not in self.closure or concl in have:
            return 0.0, None  # a wrong comparison, or a restatement
        premises = [r for r in rels if r != concl]
        if any(r not in self.closure for r in premises):
            return 0.0, None
        x, z = concl
        one_step = any((x, y) in have and (y, z) in have for _, y in have)
        v = 1.0 if one_step and all(r in have for r in premises) else 0.5
        return v, concl


def _masked(text: str, mentions) -> str:
    out, at = [], 0
    for s, e, _ in mentions:
        out += [text[at:s], _MASK]
        at = e
    return "".join(out + [text[at:]])


def _closure(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    closure = set(pairs)
    while True:
        more = {(x, w) for x, y in closure for y2, w in closure if y == y2} - closure
        if not more:
            return closure
        closure |= more
