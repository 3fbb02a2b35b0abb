"""The committed dvc.lock is current: every stage's code and params match what the lock recorded, and
every stage's data inputs are what the stage before it recorded as its outputs. Otherwise a fresh
clone's `make demo` would rerun stages (a 45-minute retrain) although nothing changed, or publish
results that no longer follow from the code."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

LOCK = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
# Outputs of one stage that another reads: DVC data, absent from a fresh clone, checked by the chain below.
OUTS = {o["path"]: o["md5"] for s in LOCK.values() for o in s.get("outs", [])}
# The committed Tables 1-3 are a partial matrix (experiment.table1: [erm, iga], table2: [iga-mean];
# docs/experiment.md); the experiment's lock entry is the last full run's, on older code and data. Strict:
# once `dvc repro experiment` has run the whole matrix, these marks fail and must go.
KNOWN_STALE = {"experiment": "reports/table1-3.md hold a partial matrix; the full one has not run on this code"}


def stages() -> list:
    return [s if s not in KNOWN_STALE else pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=KNOWN_STALE[s]))
            for s in LOCK]


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
            elif path not in OUTS:
                found.append(f"{path}: {change}")
    return found


@pytest.mark.parametrize("stage", stages())
def test_the_lock_matches_the_code_and_params(status, stage):
    assert stale_code_and_params(status.get(stage, [])) == [], f"dvc.lock is stale for {stage}: dvc repro {stage}"


@pytest.mark.parametrize("stage", stages())
def test_each_stage_read_what_the_stage_before_it_wrote(stage):
    for dep in LOCK[stage].get("deps", []):
        if dep["path"] in OUTS:
            assert dep["md5"] == OUTS[dep["path"]], f"{stage} ran on another {dep['path']} than the lock records"
