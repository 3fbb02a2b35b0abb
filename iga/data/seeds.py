"""The seed bank: procedural programs, a user's JSONL file, or reasoning-gym's gsm_symbolic."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from iga.data.program import FAMILIES, Program, generate, node_ids, render
from iga.errors import DataError
from iga.io import read_jsonl
from iga.params import SeedsParams

__all__ = ["FAMILIES", "make_seeds", "procedural_seeds", "read_seed_file", "gsm_symbolic_seeds", "seed_program"]

# Seeds read as abstract problems: mathematics templates over bare symbols.
_SEED_NAMES = {"q": "x", "p": "P", "e": "E"}


def procedural_seeds(p: SeedsParams) -> list[dict[str, Any]]:
    from iga.data.domains import DOMAINS

    rng = random.Random(f"seeds:{p.seed}")
    math = DOMAINS["mathematics"]
    rows = []
    for i in range(p.n):
        family = p.families[i % len(p.families)]
        program = generate(family, rng.randint(p.min_steps, p.max_steps), rng)
        names = {k: _SEED_NAMES[k[0]] + k[1:] for k in node_ids(program)} | {"cmp": "greater than"}
        problem, cot = render(program, math.templates, "", names, rng)
        rows.append({
            "seed_id": f"proc-{p.seed}-{i:05d}", "source": "procedural", "family": family,
            "problem": problem, "answer": program.answer(), "cot_solution": cot,
            "program": program.to_dict(), "dag": program.to_dag().to_dict(),
        })
    return rows


def seed_program(seed: dict[str, Any]) -> Program | None:
    return Program.from_dict(seed["program"]) if seed.get("program") else None


def read_seed_file(path: str | Path) -> list[dict[str, Any]]:
    """A user's seeds: one JSON object per line with `id`, `problem` and optional `answer`."""
    path = Path(path)
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no seeds (the file is empty)")
    seen: dict[str, int] = {}
    seeds = []
    # read_jsonl skips blank lines, so recover each row's line number for messages.
    lines = [n for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    for lineno, row in zip(lines, rows):
        for field in ("id", "problem"):
            if field not in row or row[field] in (None, ""):
                raise DataError(f"{path}:{lineno}: missing required field {field!r}")
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise DataError(f"{path}:{lineno}: field 'id' must be a string or integer")
        if not isinstance(row["problem"], str):
            raise DataError(f"{path}:{lineno}: field 'problem' must be a string")
        sid = str(row["id"])
        if sid in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {sid!r} (first on line {seen[sid]})")
        seen[sid] = lineno
        answer = row.get("answer")
        seeds.append({
            "seed_id": sid, "source": "jsonl", "family": None, "problem": row["problem"],
            "answer": None if answer is None else str(answer), "cot_solution": row.get("cot_solution"),
            "program": None, "dag": None,
        })
    return seeds


def gsm_symbolic_seeds(p: SeedsParams) -> list[dict[str, Any]]:
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", size=p.n, seed=p.seed)
    return [{
        "seed_id": f"gsm_symbolic-{p.seed}-{i:05d}", "source": "gsm_symbolic", "family": None,
        "problem": e["question"], "answer": str(e["answer"]), "cot_solution": e["metadata"].get("answer_cot"),
        "program": None, "dag": None,
    } for i, e in enumerate(data)]


def make_seeds(p: SeedsParams) -> list[dict[str, Any]]:
    if p.source == "procedural":
        return procedural_seeds(p)
    if p.source == "jsonl":
        return read_seed_file(p.path)
    return gsm_symbolic_seeds(p)
