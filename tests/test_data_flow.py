"""The whole data half on real Prefect (one test server per session), procedural teacher, tiny data."""
import os
import subprocess
import sys

from conftest import ROOT, write_params
from iga.io import read_jsonl
from iga.params import load_params

CONTRACT = {"seed_id", "group_id", "domain", "problem", "cot_solution", "answer", "alignment_score", "step_count"}


def test_data_flow_end_to_end(prefect_api_url, workdir):
    from flows.data import data_flow

    result = data_flow("params.yaml")
    p = load_params("params.yaml")
    n_domains = len(p.domains.all)

    seeds = read_jsonl("data/seeds/seeds.jsonl")
    instances = read_jsonl("data/isomers/instances.jsonl")
    assert len(seeds) == p.seeds.n and len(instances) == p.seeds.n * n_domains
    assert len(read_jsonl("data/isomers/dags.jsonl")) == p.seeds.n

    accepted, rejects = read_jsonl("data/gate/accepted.jsonl"), read_jsonl("data/gate/rejects.jsonl")
    regenerated = read_jsonl("data/gate/regenerated.jsonl")
    assert accepted and rejects and regenerated
    assert all(CONTRACT <= r.keys() for r in accepted + rejects)
    assert all(r["reason"] for r in rejects)
    assert all(r["alignment_score"] >= p.gate.min_alignment for r in accepted)
    assert {r["attempt"] for r in regenerated} == {2}
    # every kept group is complete in the training domains with a step spread within the gate
    by_group = {}
    for r in accepted:
        by_group.setdefault(r["group_id"], []).append(r)
    for rows in by_group.values():
        assert {r["domain"] for r in rows} >= set(p.domains.train)
        steps = [r["step_count"] for r in rows]
        assert max(steps) - min(steps) <= p.gate.max_step_diff

    gate = result["gate"]
    assert gate["groups_generated"] == p.seeds.n and gate["groups_kept"] == len(by_group)
    assert 0 < gate["kept_fraction"] < 1 and gate["regenerations"] == len(regenerated)
    assert os.path.isfile("data/gate/docs/index.html")

    train, test, ood = (read_jsonl(f"data/split/{s}.jsonl") for s in ("train", "test", "ood"))
    assert not {r["seed_id"] for r in train} & {r["seed_id"] for r in test + ood}
    assert {r["domain"] for r in ood} <= set(p.domains.ood) and {r["domain"] for r in test} <= set(p.domains.train)
    assert len(train) + len(test) == sum(r["domain"] in p.domains.train for r in accepted)
    assert result["split"]["seeds_in_both_sides"] == 0


def _run_stage(stage, cwd, api_url, env_extra=None):
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", f"flows.{stage}"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_malformed_seed_file_fails_the_stage(prefect_api_url, tmp_path):
    (tmp_path / "seeds.jsonl").write_text('{"id": "a", "problem": "x"}\n{"id": "a", "problem": "y"}\n')
    write_params(tmp_path, {"seeds.source": "jsonl", "seeds.path": "seeds.jsonl", "teacher.provider": "openai"})
    proc = _run_stage("seeds", tmp_path, prefect_api_url)
    assert proc.returncode == 2
    assert "error: seeds.jsonl:2: duplicate id 'a' (first on line 1)" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr  # one line, not Prefect's tracebacks before it
    assert not (tmp_path / "data/seeds/seeds.jsonl").exists()


def test_a_gate_below_its_floor_fails_the_stage_with_its_reasons(prefect_api_url, tmp_path):
    """The procedural teacher's flaws cost some groups (test_data_flow_end_to_end): a floor of 1.0 fails."""
    write_params(tmp_path, {"gate.min_kept_fraction": 1.0})
    proc = _run_stage("data", tmp_path, prefect_api_url)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: gate: kept ") and "of 30 groups" in line
    assert "below gate.min_kept_fraction 1.0; top rejections: " in line and "(x" in line
    assert read_jsonl(tmp_path / "data/gate/rejects.jsonl")  # written before the stop, for the diagnosis
    assert not (tmp_path / "data/split").exists()


def test_openai_without_key_fails_before_any_work(tmp_path):
    write_params(tmp_path, {"teacher.provider": "openai", "seeds.source": "jsonl", "seeds.path": "s.jsonl"})
    proc = _run_stage("isomers", tmp_path, "http://127.0.0.1:9/api")  # no server: nothing may be contacted
    assert proc.returncode == 2 and "OPENAI_API_KEY is not set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_params_name_the_key(tmp_path):
    write_params(tmp_path, {"gate.min_alignment": 2})
    proc = _run_stage("gate", tmp_path, "http://127.0.0.1:9/api")
    assert proc.returncode == 2 and "gate.min_alignment must be in [0, 1]" in proc.stderr


def test_telemetry_is_off_from_the_code_however_a_stage_starts():
    """`dvc repro` runs `python -m flows.<stage>` without the Makefile's environment: the flows package
    itself turns usage reporting off (and a value the user set wins)."""
    names = ("PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "GX_ANALYTICS_ENABLED", "DVC_NO_ANALYTICS",
             "DO_NOT_TRACK")
    env = {k: v for k, v in os.environ.items() if k not in names} | {"PYTHONPATH": str(ROOT), "DO_NOT_TRACK": "1"}
    code = "import os, flows; print(' '.join(os.environ[n] for n in %r))" % (names,)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["false", "true", "false", "1", "1"]
