"""The committed dvc.lock is current: every stage's code and params match what the lock recorded, and
every stage's data inputs are what the stage before it recorded as its outputs. Otherwise a fresh
clone's `make demo` would rerun stages (a 45-minute retrain) although nothing changed, or publish
results that no longer follow from the code.

The experiment's stages (a pair per (run, draw, seed), cost, tables) are in the lock once they have run:
a pair with committed outputs is held to the same rule, a pair not run yet is reported, not failed (the
whole matrix takes ~22 hours on 2 cores; `dvc status` lists what is missing)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

from iga.experiment.pairs import dvc_pairs
from iga.params import load_params

LOCK = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
# Outputs of one stage that another reads: DVC data, absent from a fresh clone, checked by the chain below.
OUTS = {o["path"]: o["md5"] for s in LOCK.values() for o in s.get("outs", [])}
# The experiment's stages whose outputs are committed to git (`selected@` writes DVC data, like the split's).
EXPERIMENT = [f"{group}@{key}" for group, items in dvc_pairs(load_params(ROOT / "params.yaml")).items()
              if group != "selected" for key in items] + ["cost", "tables"]


def defined() -> set[str]:
    """The stages dvc.yaml defines now, `foreach` expanded (DVC keeps a removed stage's lock entry)."""
    context = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for path in dvc_yaml.get("vars", []):
        context |= yaml.safe_load((ROOT / path).read_text())
    names = set()
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" not in stage:
            names.add(name)
            continue
        items = context
        for part in stage["foreach"].removeprefix("${").removesuffix("}").split("."):
            items = items[part]
        names |= {f"{name}@{item}" for item in items}
    return names


CURRENT = [s for s in LOCK if s in defined()]


@pytest.fixture(scope="module")
def status() -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def stale_code_and_params(entries: list) -> list[str]:
    """What `dvc status` finds changed in a stage's code and params, ignoring data that is simply absent."""
    found = []
    for entry in entries:
        if not isinstance(entry, dict):  # "changed command", "always changed"
            found.append(str(entry))
            continue
        for path, change in entry.get("changed deps", {}).items():
            if path == "params.yaml":
                found += [f"params {key}: {how}" for key, how in change.items()]
            elif not any(out == path or out.startswith(f"{path}/") for out in OUTS):  # a folder of outputs: data
                found.append(f"{path}: {change}")
    return found


@pytest.mark.parametrize("stage", CURRENT)
def test_the_lock_matches_the_code_and_params(status, stage):
    assert stale_code_and_params(status.get(stage, [])) == [], f"dvc.lock is stale for {stage}: dvc repro {stage}"


def test_the_experiment_has_run_or_is_reported_as_not_run_yet():
    without = [f"{s}: {o['path']}" for s in EXPERIMENT if s in LOCK for o in LOCK[s].get("outs", [])
               if not (ROOT / o["path"]).exists()]
    assert without == [], "dvc.lock records experiment stages whose outputs are not committed: git add them"
    missing = [s for s in EXPERIMENT if s not in LOCK]
    if missing:
        pytest.skip(f"not run yet: {len(missing)} of {len(EXPERIMENT)} experiment stages ({', '.join(missing[:3])} "
                    "...); `python -m flows.experiment` runs them, `dvc status` lists them")


@pytest.mark.parametrize("stage", CURRENT)
def test_each_stage_read_what_the_stage_before_it_wrote(stage):
    for dep in LOCK[stage].get("deps", []):
        if dep["path"] in OUTS:
            assert dep["md5"] == OUTS[dep["path"]], f"{stage} ran on another {dep['path']} than the lock records"
