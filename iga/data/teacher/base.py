"""The teacher interface (paper §3.3): extract a seed's DAG, instantiate it per domain, verify."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

from iga.data.answers import count_steps
from iga.data.dag import LogicalDAG
from iga.errors import DataError, TeacherError
from iga.params import Params

T = TypeVar("T")
R = TypeVar("R")


class Teacher(ABC):
    provider: str

    def __init__(self, params: Params):
        self.params = params

    def map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """fn (extraction, isomer) over a chunk; a remote teacher makes the chunk's calls concurrently."""
        return [fn(item) for item in items]

    def close(self) -> None:
        """Release connections and threads."""

    def ledger(self) -> list[dict[str, Any]]:
        """One row per call this teacher made or answered from its cache (iga.data.teacher.ledger)."""
        return []

    @abstractmethod
    def extract(self, seed: dict[str, Any], attempt: int) -> dict[str, Any]:
        """The seed's logical DAG (and a CoT for the seed): {dag, cot_solution}; raises TeacherError."""

    @abstractmethod
    def instantiate(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, attempt: int) -> dict[str, Any]:
        """One domain instance: {problem, cot_solution, answer, ...}; raises TeacherError."""

    @abstractmethod
    def verify(self, seed: dict[str, Any], dag: LogicalDAG, domain: str, instance: dict[str, Any]) -> float:
        """Structural alignment of the instance with the seed DAG, in [0, 1]; raises TeacherError."""

    @property
    def style(self) -> str:
        """How this teacher writes an instance's own CoT (a candidate's `style` at j = 0)."""
        return "sampled"

    def sample(self, seed: dict[str, Any], row: dict[str, Any], j: int,
               dag: LogicalDAG | None = None) -> dict[str, Any]:
        """Candidate CoT j of a gated instance row (its problem unchanged): {sample, style, flaw, cot_solution,
        answer, alignment_score, step_count, error}. j = 0 is the row's own CoT, as it is; j >= 1 a new one
        (`candidate`), deterministic in (seed, row, j), whose teacher failure is recorded in `error`, not raised.
        `dag`: the seed's logical DAG that alignment is measured against (default: seed["dag"])."""
        if j == 0:
            return {"sample": 0, "style": self.style, "flaw": row.get("flaw"), "cot_solution": row["cot_solution"],
                    "answer": row["answer"], "alignment_score": row["alignment_score"],
                    "step_count": row["step_count"], "error": row.get("error")}
        try:
            return self.candidate(seed, row, j, dag)
        except TeacherError as e:
            return {"sample": j, "style": self.style, "flaw": None, "cot_solution": None, "answer": None,
                    "alignment_score": None, "step_count": None, "error": str(e)}

    def candidate(self, seed: dict[str, Any], row: dict[str, Any], j: int,
                  dag: LogicalDAG | None = None) -> dict[str, Any]:
        """Candidate j >= 1 of `sample`; raises TeacherError."""
        raise TeacherError(f"the {self.provider} teacher cannot write candidate CoTs (teacher.samples must be 1)")

    def verify_step(self, seed: dict[str, Any], row: dict[str, Any], prefix: list[str], line: str) -> float:
        """How valid `line` is as the next CoT line of the row's problem after the lines `prefix`, in [0, 1]."""
        raise NotImplementedError(f"the {self.provider} teacher has no step verifier (verify_step); the procedural "
                                  f"teacher's exact one is iga.data.verify")

    def extraction(self, seed: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
        """A row of data/isomers/dags.jsonl; a failed extraction is recorded, not raised (the gate
        regenerates it with the seed's instances)."""
        row = {"seed_id": seed["seed_id"], "attempt": attempt, "dag": None, "cot_solution": None, "error": None}
        try:
            row.update(self.extract(seed, attempt))
        except TeacherError as e:
            row["error"] = str(e)
        return row

    def isomer(self, seed: dict[str, Any], extraction: dict[str, Any], domain: str, attempt: int) -> dict[str, Any]:
        """A row of the instances table. Any teacher failure becomes a row with `error` set."""
        row: dict[str, Any] = {
            "seed_id": seed["seed_id"], "group_id": f"g-{seed['seed_id']}", "domain": domain,
            "domain_kind": "train" if domain in self.params.domains.train else "ood",
            "attempt": attempt, "teacher": self.provider, "problem": None, "cot_solution": None,
            "answer": None, "alignment_score": None, "step_count": None, "flaw": None, "error": None,
        }
        try:
            if extraction["error"]:
                raise TeacherError(f"no DAG for this seed ({extraction['error']})")
            try:
                dag = LogicalDAG.from_dict(extraction["dag"], f"DAG of seed {seed['seed_id']}")
            except DataError as e:
                raise TeacherError(str(e)) from None
            inst = self.instantiate(seed, dag, domain, attempt)
            score = self.verify(seed, dag, domain, inst)
        except TeacherError as e:
            row["error"] = str(e)
            return row
        row.update({k: inst.get(k) for k in ("problem", "cot_solution", "answer", "flaw")})
        row["alignment_score"] = score
        row["step_count"] = count_steps(inst["cot_solution"])
        return row
