"""Teacher selection: every named teacher writes the same problems in its own way; `flows.rank_teachers`
and `flows.rsr_experiment` end to end on real Prefect with the tiny student; the rank correlation's
bootstrap on a known case."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, write_params
from iga.experiment.teachers import first_groups, rewrite, spearman_ci, variant
from iga.params import TeacherVariant, load_params


def test_teachers_write_the_same_problems_their_own_way():
    from iga.data.seeds import procedural_seeds

    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": 6, "teacher.flaw_rate": 0.0})
    seeds = {s["seed_id"]: s for s in procedural_seeds(params.seeds)}
    rows = [{"seed_id": sid, "domain": d, "attempt": 1} for sid in seeds for d in params.domains.train]
    plain = rewrite(variant(params, TeacherVariant("plain", 0.0)), seeds, rows)
    terse = rewrite(variant(params, TeacherVariant("terse", 0.0)), seeds, rows)
    flawed = rewrite(variant(params, TeacherVariant("plain", 0.9)), seeds, rows)
    assert [r["cot_solution"] for r in plain] != [r["cot_solution"] for r in terse]
    assert [r["answer"] for r in plain] == [r["answer"] for r in terse]
    assert [r["step_count"] for r in plain] == [r["step_count"] for r in terse]
    assert all(r["flaw"] is None for r in plain + terse) and any(r["flaw"] for r in flawed)
    assert first_groups([{"group_id": g} for g in "cabca"], 2) == [{"group_id": g} for g in "aba"]


def test_spearman_interval_covers_a_perfect_ranking():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 4)
    scores, correct = {}, {}
    for i, t in enumerate("abcde"):  # a lower dataset score, a better student, by a wide margin
        rank = rng.normal(5 - i, 0.05, groups.size)
        scores[t] = {"avg_rank": rank, "avg_nll": np.ones(groups.size), "rsr": rank}
        correct[t] = (rng.random((2, 60)) < 0.1 + 0.2 * i).astype(float)
    out = spearman_ci(scores, correct, groups, np.repeat(np.arange(20), 3), n_boot=300)
    assert out["rsr"]["rho"] == pytest.approx(1.0)
    assert out["rsr"]["ci95"][0] > 0.5 and out["avg_nll"]["replicates"] == 0  # constant NLL: no ranking at all


def test_rank_teachers_and_the_rsr_experiment_end_to_end(prefect_api_url, workdir, tiny_base):
    import shutil

    from flows.data import data_flow
    from flows.rank_teachers import rank_teachers_flow
    from flows.rsr_experiment import rsr_experiment_flow

    teachers = {"plain": {"style": "plain", "flaw_rate": 0.0}, "terse": {"style": "terse", "flaw_rate": 0.0},
                "flawed": {"style": "plain", "flaw_rate": 0.9}}
    write_params(workdir, {"seeds.n": 12, "split.test_fraction": 0.4, "rank_teachers.teachers": teachers,
                           "rank_teachers.groups": 3, "rank_teachers.seeds": [0], "rank_teachers.steps": 2,
                           "rank_teachers.eval_groups": 2, "experiment.max_new_tokens": 8})
    data_flow("params.yaml")
    shutil.copytree(tiny_base, workdir / "models/base")
    ranking = rank_teachers_flow("params.yaml")
    assert ranking.count("\n| ") == 4 and all(f"| {t} |" in ranking for t in teachers)  # header + 3 teachers
    report = rsr_experiment_flow("params.yaml")
    assert "| RSR |" in report and "| mean NLL alone |" in report and "| rsr-selected |" in report
    results = json.loads(Path("experiments/rsr/results.json").read_text())
    assert set(results["teachers"]) == set(teachers) and len(results["runs"]) == 5  # and the two selected datasets
    assert results["problems"] == 2 * (len(load_params("params.yaml").domains.all))
