"""The experiment's DVC matrix: the items of dvc.yaml's `run` and `sweep` foreach stages (experiments/pairs.yaml),
and of `selected`, the training data each selection strategy the runs name chooses; generated from params.yaml's
experiment section here and nowhere else, and the check that they still agree.

DVC cannot look a run's method up in params (no nested interpolation), so each item names what its stage
depends on: the run (`experiment.runs.<run>`), its method (`methods.<method>`) and, for a random draw, the
section of `experiment.ranges` its method's kind draws from besides `train` (`ranges`: the kind, or `train`
again for a kind with no section of its own: DVC needs a key that exists, and reads a repeated one once).
A change to one of them reruns exactly the pairs that read it. `select` names the run's training data
(data/select/<select>/train.jsonl, written by `selected@<select>`).
"""
from __future__ import annotations

from typing import Any, Mapping

import yaml

from iga.errors import ConfigError
from iga.experiment.sweep import matrix, ranges_read
from iga.params import Params

REGENERATE = "python -m flows.experiment pairs"
HEADER = ("# Generated from params.yaml (experiment.table1, table2, oracle, hparam_draws, seeds, table2_seeds,\n"
          f"# runs) by `{REGENERATE}` (iga/experiment/pairs.py): dvc.yaml's `selected` (the runs'\n"
          "# training data), `run` (draw 0) and `sweep` (draws 1..) stages, one per item.\n")
GROUPS = ("selected", "run", "sweep")
Items = dict[str, dict[str, dict[str, Any]]]  # group (selected | run | sweep) -> stage key -> item


def dvc_pairs(params: Params) -> Items:
    """Every pair of the matrix as a foreach item, in the matrix's order (draw by draw), and the selection
    strategies they train on, in the order of first use."""
    out: Items = {group: {} for group in GROUPS}
    for pair in matrix(params):
        run = params.experiment.runs[pair.run]
        item = {"run": pair.run, "method": run.method, "draw": pair.draw, "seed": pair.seed, "select": run.select}
        if pair.draw:
            item["ranges"] = ranges_read(params, pair.run)
        out[pair.group][pair.key] = item
        out["selected"].setdefault(run.select, {"strategy": run.select})
    return out


def render(items: Items) -> str:
    """The vars file: `pairs: {run: ..., sweep: ...}`, one item per line."""
    lines = [HEADER.rstrip("\n"), "pairs:"]
    for group in GROUPS:
        lines.append(f"  {group}:" + ("" if items[group] else " {}"))
        lines += [f"    {key}: {yaml.safe_dump(item, default_flow_style=True, sort_keys=False).strip()}"
                  for key, item in items[group].items()]
    return "\n".join(lines) + "\n"


def differences(found: Items | None, expected: Items) -> dict[str, list[str]]:
    """Stage names `expected` has and `found` lacks (missing), the other way round (extra), and in both with
    another item (changed)."""
    old, new = _by_stage(found or {}), _by_stage(expected)
    return {"missing": [s for s in new if s not in old], "extra": [s for s in old if s not in new],
            "changed": [s for s in new if s in old and old[s] != new[s]]}


def check(params: Params, found: Items | None, source: str) -> None:
    """`found` (the vars file's `pairs`) lists exactly the pairs params.yaml asks for, each depending on what
    params say it reads; else a ConfigError naming them and the command that regenerates the file."""
    diff = differences(found, dvc_pairs(params))
    problems = [f"{what}: {_few(diff[key])}" for key, what in (
        ("missing", "missing"), ("extra", "no longer asked for"), ("changed", "changed")) if diff[key]]
    if problems:
        raise ConfigError(f"{source} disagrees with params.yaml's experiment matrix ({'; '.join(problems)}): "
                          f"run `{REGENERATE}` to rewrite it (`python -m flows.experiment` also runs what is missing)")


def _by_stage(items: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{group}@{key}": item for group, entries in items.items() for key, item in (entries or {}).items()}


def _few(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
