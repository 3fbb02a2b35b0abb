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
