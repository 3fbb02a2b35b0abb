"""What each result depends on, said once: for every stage, the params.yaml keys it reads and the code
it runs. Everything that decides whether a result is still valid comes from here:

- dvc.yaml's `params:` and code `deps:` (tests/test_stages.py checks dvc.yaml against `dvc_params`
  and `dvc_code`);
- a training checkpoint's fingerprint (`fingerprint`; `train-run` for the train stage, an experiment
  pair's own stage for its checkpoint): resume only into the same computation;
- an evaluation's params hash (`params_hash("evaluate", ...)`): metrics computed under another
  params.yaml are refused; the registry's evaluation key (`params_hash("scores", ...)`): a champion
  scored on other problems or settings is scored again before a paired comparison.

A stage's code is the import closure, within this project, of its entry modules (read from the
source, nothing imported), plus the data files that code reads. Params are sections or dotted keys;
`${item}` is the method of a `foreach` stage, `${item.<field>}` a field of an experiment pair's item
(experiments/pairs.yaml); `exclude` drops settings that do not change what a stage computes (threads,
checkpoint frequency, the list of methods to run).
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iga.params import Params

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("iga", "tasks", "flows")
ITEM = "${item}"
RUN, METHOD, RANGES = "${item.run}", "${item.method}", "${item.ranges}"  # an experiment pair's (iga/experiment/pairs)


@dataclass(frozen=True)
class Stage:
    entry: tuple[str, ...]  # modules whose project-internal import closure is the stage's code
    params: tuple[str, ...]  # params.yaml sections or dotted keys the stage reads
    exclude: tuple[str, ...] = ()  # keys under `params` that do not change the result
    files: tuple[str, ...] = ()  # data files the code reads (prompts), relative to the project root
    after: tuple[str, ...] = ()  # stages whose params reach this one's result through their outputs


# How a run is spread over threads and ranks changes its numbers only by float rounding (data-parallel: within
# the bound of the run's own reduction-order noise, tests/test_distributed.py), as the thread count already does.
_TRAIN_EXCLUDE = ("train.methods", "train.threads", "train.checkpoint_every", "train.nproc",
                  "train.collective_timeout_s")
# A pair: its run and method, and what every pair shares (split: the instance-level ablation splits itself;
# experiment.val_seeds: the validation seeds held out of training). A draw's values come from its number and,
# for a random draw, the ranges it reads. Where pairs run (experiment.runner, ray) changes nothing.
_PAIR = (f"experiment.runs.{RUN}", f"methods.{METHOD}", "experiment.steps", "experiment.eval_groups",
         "experiment.max_new_tokens", "experiment.val_seeds", "domains", "split", "student", "lora", "train",
         "eval.dtype", "eval.batch_size", "eval.nll_batch_size")
_PAIR_EXCLUDE = (*_TRAIN_EXCLUDE, "train.seed", "train.steps")  # a pair sets both
STAGES: dict[str, Stage] = {
    "seeds": Stage(("flows.seeds",), ("seeds",)),
    "isomers": Stage(("flows.isomers",), ("domains", "teacher"), files=("iga/data/teacher/prompts",)),
    "gate": Stage(("flows.gate",), ("gate", "domains", "teacher"), files=("iga/data/teacher/prompts",)),
    "split": Stage(("flows.split",), ("split", "domains")),
    "select": Stage(("flows.select",), ("select", "teacher", "gate.min_alignment", "gate.max_step_diff",
                                        "student.dtype", "train.device"), files=("iga/data/teacher/prompts",)),
    "student": Stage(("flows.student",), ("student.base",)),
    # The experiment's training data per selection strategy its runs name (`experiment.runs.<run>.select`), whatever
    # the demo's select.strategy says.
    "selected": Stage(("flows.select",), ("select", "teacher", "gate.min_alignment", "gate.max_step_diff",
                                          "student.dtype", "train.device"), exclude=("select.strategy",),
                      files=("iga/data/teacher/prompts",)),
    "train": Stage(("flows.train",), (f"methods.{ITEM}", "domains.train", "student.dtype", "lora", "train"),
                   exclude=_TRAIN_EXCLUDE, files=("iga/data/teacher/prompts",)),  # VCD's openai step verifier
    "evaluate": Stage(("flows.evaluate",), ("eval", "domains", "student.dtype", "train.device"),
                      exclude=("eval.threads",), after=("train",)),
    # The experiment (docs/experiment.md): one stage per (run, draw, seed), draw 0 (`run`) or a random draw
    # (`sweep`, which also reads the ranges it draws from); Table 3's step costs; the tables over all of them.
    "run": Stage(("flows.run",), _PAIR, exclude=_PAIR_EXCLUDE),
    "sweep": Stage(("flows.run",), (*_PAIR, "experiment.ranges.train", f"experiment.ranges.{RANGES}"),
                   exclude=_PAIR_EXCLUDE),
    "cost": Stage(("flows.cost",), ("experiment.cost_steps", "experiment.table1", "experiment.runs", "methods",
                                    "domains.train", "student", "lora", "train"),
                  exclude=tuple(k for k in _TRAIN_EXCLUDE if k != "train.threads")),  # threads change a step's time
    "tables": Stage(("flows.tables",), ("experiment", "domains", "student.base", "train.groups_per_batch"),
                    exclude=("experiment.cost_steps", "experiment.runner", "experiment.ray", "experiment.ranges")),
    # Not DVC stages: what a checkpoint of the train stage must match, and what makes two models' per-problem
    # scores comparable (the same held-out rows, settings and base model).
    "train-run": Stage(("iga.train.loop", "iga.train.methods", "iga.train.student", "iga.data.verify"),
                       (f"methods.{ITEM}", "domains.train", "student", "lora", "train"), exclude=_TRAIN_EXCLUDE),
    "scores": Stage(("iga.eval.evaluate",), ("student", "eval"), exclude=("eval.threads", "eval.lcs_groups")),
}


# --- code -------------------------------------------------------------------------------------------

def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (`from a import b` may name a module a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in PACKAGES}


def closure(entry: tuple[str, ...]) -> list[Path]:
    """The project files the entry modules import, directly or not, with the packages they sit in
    (an empty `__init__.py` is left out: it runs no code)."""
    seen: set[Path] = set()
    todo = list(entry)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = _module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo += _imports(path)
    return sorted(p for p in seen if p.stat().st_size)


def dvc_code(stage: str) -> list[str]:
    """The code deps of `stage` as dvc.yaml lists them: files relative to the project root."""
    spec = STAGES[stage]
    return sorted([str(p.relative_to(ROOT)) for p in closure(spec.entry)] + list(spec.files))


def code_hash(stage: str) -> str:
    """Of every byte of the stage's code and data files."""
    h = hashlib.sha256()
    for rel in dvc_code(stage):
        path = ROOT / rel
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                h.update(str(file.relative_to(ROOT)).encode())
                h.update(file.read_bytes())
    return h.hexdigest()


# --- params -----------------------------------------------------------------------------------------

def _fields(tp: Any) -> list[str] | None:
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else None


def _expand(key: str) -> list[str]:
    """A section or key -> itself, or its fields where some of them are excluded (see dvc_params)."""
    tp: Any = Params
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return [key]  # a dict entry (methods.erm, experiment.runs.x): no fields to list
        tp = hints[part]
    return [f"{key}.{name}" for name in _fields(tp) or []]


def dvc_params(stage: str) -> list[str]:
    """`params:` as dvc.yaml lists them: each key of the spec, or, where the spec excludes some of a
    section's keys, the section's other keys one by one (DVC cannot exclude)."""
    spec = STAGES[stage]
    out = []
    for key in spec.params:
        if any(x.startswith(key + ".") for x in spec.exclude):
            out += [k for k in _expand(key) if k not in spec.exclude]
        else:
            out.append(key)
    return out


def _lookup(params: Params, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return _plain(node)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


Item = str | dict[str, Any] | None  # a foreach item: a method name, or an experiment pair's fields


def _resolve(key: str, item: Item) -> str:
    if isinstance(item, dict):
        for field, value in item.items():
            key = key.replace(f"${{item.{field}}}", str(value))
        return key
    return key.replace(ITEM, item) if item is not None else key


def params_values(stage: str, params: Params, item: Item = None) -> dict[str, Any]:
    """{key: value} of every param the stage's result depends on, its upstream stages' included."""
    values = {}
    for name in (*STAGES[stage].after, stage):
        for key in dvc_params(name):
            key = _resolve(key, item)
            values[key] = _lookup(params, key)
    return values


def _digest(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()


def params_hash(stage: str, params: Params, item: Item = None, **inputs: Any) -> str:
    """The stage's params (and its upstream stages'), with `inputs` (data md5s, a run's seed, what `auto`
    settings resolved to on this machine), hashed: a result recorded under another hash was computed
    under another params.yaml or on other inputs."""
    return _digest({"params": params_values(stage, params, item), **inputs})[:16]


def fingerprint(stage: str, params: Params, item: Item = None, **inputs: Any) -> str:
    """What a checkpoint or a finished run must match: `params_hash`, and every byte of the stage's code."""
    return params_hash(stage, params, item, code=code_hash(stage), **inputs)
