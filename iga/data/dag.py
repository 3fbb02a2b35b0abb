"""The abstract logical structure of a seed problem (paper §3.3): a typed DAG."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iga.errors import DataError

NODE_TYPES = ("ENTITY", "RELATION", "CONSTRAINT", "PROPOSITION", "GOAL")
EDGE_LABELS = ("IMPLIES", "REQUIRES", "CAUSES", "CONTRADICTS", "IS_A", "HAS_PROPERTY")


@dataclass(frozen=True)
class Node:
    id: str
    type: str
    description: str


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    label: str


@dataclass(frozen=True)
class LogicalDAG:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    logical_form: str
    step_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [{"id": n.id, "type": n.type, "description": n.description} for n in self.nodes],
            "edges": [{"from": e.src, "to": e.dst, "label": e.label} for e in self.edges],
            "logical_form": self.logical_form,
            "step_count": self.step_count,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "LogicalDAG":
        """Validate a DAG from JSON (teacher output or file); errors name `where` and the field."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise DataError(f"{where}: {msg}")

        need(isinstance(d, dict), "DAG must be an object")
        for k in ("nodes", "edges", "logical_form", "step_count"):
            need(k in d, f"DAG is missing field {k!r}")
        need(isinstance(d["nodes"], list) and d["nodes"], "nodes must be a non-empty list")
        need(isinstance(d["edges"], list), "edges must be a list")
        nodes = []
        for i, n in enumerate(d["nodes"]):
            need(isinstance(n, dict) and all(isinstance(n.get(k), str) for k in ("id", "type", "description")),
                 f"nodes[{i}] needs string fields id, type, description")
            need(n["type"] in NODE_TYPES, f"nodes[{i}].type {n['type']!r} not in {NODE_TYPES}")
            nodes.append(Node(n["id"], n["type"], n["description"]))
        ids = [n.id for n in nodes]
        need(len(set(ids)) == len(ids), "node ids must be unique")
        edges = []
        for i, e in enumerate(d["edges"]):
            need(isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("from", "to", "label")),
                 f"edges[{i}] needs string fields from, to, label")
            need(e["label"] in EDGE_LABELS, f"edges[{i}].label {e['label']!r} not in {EDGE_LABELS}")
            need(e["from"] in ids and e["to"] in ids, f"edges[{i}] refers to an unknown node")
            edges.append(Edge(e["from"], e["to"], e["label"]))
        need(isinstance(d["logical_form"], str), "logical_form must be a string")
        need(isinstance(d["step_count"], int) and d["step_count"] >= 1, "step_count must be a positive integer")
        dag = cls(tuple(nodes), tuple(edges), d["logical_form"], d["step_count"])
        need(dag.is_acyclic(), "edges form a cycle")
        return dag

    def is_acyclic(self) -> bool:
        succ: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for e in self.edges:
            succ[e.src].append(e.dst)
        state: dict[str, int] = {}  # 1 on the stack, 2 done

        def visit(u: str) -> bool:
            state[u] = 1
            for v in succ[u]:
                if state.get(v) == 1 or (v not in state and not visit(v)):
                    return False
            state[u] = 2
            return True

        return all(u in state or visit(u) for u in succ)


def structural_alignment(instance: LogicalDAG, seed: LogicalDAG) -> float:
    """How well an instance's logical structure matches its seed's, in [0, 1].

    The product of the Jaccard similarities of the typed node sets and of the labelled edge sets:
    both must match, so one rewired dependency (same nodes, one wrong edge) costs as much as its
    share of the edges, and a dropped or extra step pays for its node and for its edges.
    """

    def jaccard(a: set, b: set) -> float:
        return len(a & b) / len(a | b) if a | b else 1.0

    nodes = jaccard({(n.id, n.type) for n in instance.nodes}, {(n.id, n.type) for n in seed.nodes})
    edges = jaccard(set(instance.edges), set(seed.edges))
    return round(nodes * edges, 4)
