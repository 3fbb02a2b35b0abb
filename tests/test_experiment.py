"""The experiment: data variants, verdicts and tables, params checks, and `flows.experiment` end to end on
real Prefect and MLflow with the tiny student (a re-run skips every finished run)."""
import json
import re
from collections import Counter

import pytest

from conftest import ROOT, write_params
from iga.errors import ConfigError
from iga.eval.scores import DEPTHS
from iga.experiment.variants import PHRASINGS, complete_groups, held_out, train_units
from iga.io import write_jsonl
from iga.params import RunConfig, load_params
from iga.report.tables import COMPARED, table3
from tasks.paths import ACCEPTED, TABLES, experiment_result

DOMAINS = ("mathematics", "medical", "legal", "science")


def rows_for(n_seeds: int, domains: tuple[str, ...]) -> list[dict]:
    from iga.data.seeds import procedural_seeds
    from iga.data.teacher import make_teacher

    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": n_seeds, "teacher.flaw_rate": 0.0})
    teacher = make_teacher(params)
    return [teacher.isomer(s, teacher.extraction(s), d, 1) for s in procedural_seeds(params.seeds) for d in domains]


@pytest.fixture(scope="module")
def rows():
    return rows_for(12, DOMAINS)


def run(data, domains=None, split="seed", method="iga"):
    return RunConfig(method, data, domains, split)


def test_isomers_are_whole_groups_in_domain_order(rows):
    units = train_units(rows, run("isomers"), DOMAINS, 0, "x")
    assert len(units) == 12
    assert all([r["domain"] for r in u] == list(DOMAINS) and len({r["group_id"] for r in u}) == 1 for u in units)


def test_random_pairing_keeps_the_rows_and_breaks_the_groups(rows):
    units = train_units(rows, run("random_pairing"), DOMAINS, 0, "x")
    assert Counter(id(r) for u in units for r in u) == Counter(id(r) for r in rows)
    assert all([r["domain"] for r in u] == list(DOMAINS) for u in units)
    assert sum(len({r["group_id"] for r in u}) == 1 for u in units) <= 1  # almost no unit is an isomer group
    assert units != train_units(rows, run("random_pairing"), DOMAINS, 1, "x")  # seeded


def test_shuffled_units_are_single_instances_and_seed_only_one_domain_rephrased(rows):
    shuffled = train_units(rows, run("shuffled"), DOMAINS, 0, "x")
    assert len(shuffled) == len(rows) and all(len(u) == 1 for u in shuffled)
    seed_only = train_units(rows, run("seed_only", ("mathematics",)), DOMAINS, 0, "x")
    assert len(seed_only) == 12 * len(PHRASINGS)
    assert {u[0]["domain"] for u in seed_only} == {"mathematics"}
    math = {r["group_id"]: r["problem"] for r in rows if r["domain"] == "mathematics"}
    assert all(u[0]["problem"].endswith(math[u[0]["group_id"]]) for u in seed_only)
    assert len({u[0]["problem"] for u in seed_only}) == len(seed_only)


def test_domain_subsets_keep_the_named_domains_in_order(rows):
    units = train_units(rows, run("isomers", ("mathematics", "legal")), DOMAINS, 0, "x")
    assert all([r["domain"] for r in u] == ["mathematics", "legal"] for u in units)


def test_held_out_takes_whole_seeds_and_complete_groups_drops_broken_ones(rows):
    ood = [dict(r, domain="finance") for r in rows if r["domain"] == "mathematics"]
    test, ood_rows = held_out(rows, ood, 3, "x")
    assert len({r["seed_id"] for r in test}) == 3 and len(test) == 12 and len(ood_rows) == 3
    broken = [r for r in rows if not (r["group_id"] == rows[0]["group_id"] and r["domain"] == "legal")]
    assert len(complete_groups(broken, DOMAINS)) == len(rows) - 4


def _evaluation(ood_right: float, nll_ood: float, seed: int, n_seeds: int = 40) -> dict:
    """Synthetic scores: per test seed 2 ID rows and 1 OOD row, an LCS group."""
    import random

    rng = random.Random(seed)
    rows, groups = [], []
    for i in range(n_seeds):
        s = f"s{i:02d}"
        for d in ("math", "legal"):
            rows.append({"set": "test", "id": f"{s}/{d}", "seed_id": s, "domain": d, "correct": rng.random() < 0.7,
                         "nll": 0.5 + rng.gauss(0, 0.05), "tokens": 20})
        rows.append({"set": "ood", "id": f"{s}/fin", "seed_id": s, "domain": "fin",
                     "correct": rng.random() < ood_right, "nll": nll_ood + rng.gauss(0, 0.05), "tokens": 20})
        groups.append({"group_id": f"g{s}", "seed_id": s,
                       **{d: {"raw": 1.0, "normalized": 0.04 + rng.gauss(0, 0.001)} for d in DEPTHS}})
    return {"scores": rows, "lcs": groups}


def test_verdicts_are_paired_and_holm_corrected():
    from iga.report.tables import verdicts

    iga = [_evaluation(0.9, 0.6, seed) for seed in range(3)]
    worse = [_evaluation(0.2, 0.9, 10 + seed) for seed in range(3)]
    same = [_evaluation(0.9, 0.6, seed) for seed in range(3)]
    results = verdicts([("worse", iga, worse), ("same", iga, same)])
    assert results[("worse", "ood_accuracy")][2] == "win" and results[("worse", "nll_ood")][2] == "win"
    assert results[("worse", "ood_accuracy")][0].delta == pytest.approx(0.7, abs=0.1)
    assert all(results[("same", f)][2] == "tie" and results[("same", f)][0].delta == 0 for _, f, *_ in COMPARED)
    assert all(adjusted >= c.p for c, adjusted, _ in results.values())  # Holm never lowers a p-value


def test_table3_is_relative_to_erm():
    cost = {"methods": {"erm": {"step_time_s": 2.0, "step_times_s": [2.0], "peak_mb": 100.0, "device": "cpu",
                                "sequences": 4, "tokens": 900},
                        "iga": {"step_time_s": 3.0, "step_times_s": [3.0], "peak_mb": 150.0, "device": "cpu",
                                "sequences": 4, "tokens": 900}},
            "runs": {"erm": "erm", "cot-distill": "erm", "iga": "iga"}}
    text = table3(cost)
    assert "| iga | 3.00 | 1.50× | 150 | 1.50× |" in text and "cot-distill train ERM" in text


@pytest.mark.parametrize("key, value, message", [
    ("experiment.runs.lora-sft.domains", ["mathematics", "legal"], "must name one domain"),
    ("experiment.runs.iga-n2.domains", ["mathematics", "legal", "science"], "must divide the 4 sequences"),
    ("experiment.runs.iga-n2.domains", ["mathematics", "finance"], "must be a subset of domains.train"),
    ("experiment.runs.iga.method", "nope", "experiment.runs.iga.method must be a key of methods"),
    ("experiment.table2", ["iga", "missing"], "experiment.table2[1] must be a key of experiment.runs"),
    ("experiment.table1", ["erm", "irm"], "experiment.table1 must include iga"),
    ("methods.iga-factor-mask.projection", "chain_rule", "must be none when reconstruction is none"),
])
def test_bad_experiment_params_name_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_params(write_params(tmp_path, {key: value}))


def test_experiment_flow_runs_the_matrix_writes_the_tables_and_resumes(prefect_api_url, workdir):
    from mlflow.tracking import MlflowClient

    from flows.experiment import experiment_flow
    from flows.split import split_flow
    from flows.student import student_flow

    write_params(workdir, {"experiment.seeds": [0, 1], "experiment.steps": 2, "experiment.eval_groups": 2,
                           "experiment.max_new_tokens": 8, "experiment.cost_steps": 1,
                           "experiment.table1": ["erm", "lora-sft", "cot-distill", "pcgrad", "iga"],
                           "experiment.table2": ["iga-random-pairing", "iga-instance-split", "iga-n2"]})
    write_jsonl(ACCEPTED, rows_for(30, DOMAINS + ("finance", "engineering")))  # 5 test seeds
    split_flow("params.yaml")  # the runs read the split stage's outputs, as `dvc repro experiment` gives them
    student_flow("params.yaml")
    experiment_flow("params.yaml")
    names = ["erm", "lora-sft", "cot-distill", "pcgrad", "iga", "iga-random-pairing", "iga-instance-split", "iga-n2"]
    results = {(n, s): json.loads(experiment_result(n, s).read_text()) for n in names for s in (0, 1)}
    assert all(len(r["history"]) == 2 and r["eval"]["n_id"] == 8 and r["eval"]["n_ood"] == 4
               for r in results.values())  # generated: 2 test seeds; NLL and LCS: every test seed
    assert all(r["eval"]["nll_n_seeds"] == r["eval"]["lcs_groups"] == 5 for n, r in results.items()
               if n[0] != "iga-instance-split")
    assert results[("erm", 0)]["params_hash"] != results[("erm", 1)]["params_hash"]
    assert not list((workdir / "experiments").glob("runs/*/*.checkpoints"))  # finished runs keep no checkpoint
    t1, t2, t3 = (TABLES[n].read_text() for n in (1, 2, 3))
    assert all(f"| {n} |" in t1 for n in names[:5]) and "wins" in t1 and "iga vs" in t1
    assert "Holm" in t1 and "p_H" in t1 and "Minimum detectable difference" in t1
    assert re.search(r"\| erm \| [^|]+ \| [\d.]+ \[[\d.]+, [\d.]+\] \|", t1)  # every figure with its interval
    assert "| iga-n2 | domains mathematics, legal |" in t2 and "instance-level split" in t2
    assert all(f"| {m} |" in t3 for m in ("erm", "pcgrad", "iga")) and "| erm | " in t3 and "1.00×" in t3
    assert (workdir / "reports/experiment/summary.md").is_file()
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    parent = json.loads((workdir / "experiments/parent.json").read_text())["mlflow_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 16 and {c.info.status for c in children} == {"FINISHED"}
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/table1.md", "report/table3.md"}

    # resumable: a re-run trains nothing; a changed run reruns alone
    mtimes = {k: experiment_result(*k).stat().st_mtime_ns for k in results}
    write_params(workdir, {"experiment.seeds": [0, 1], "experiment.steps": 2, "experiment.eval_groups": 2,
                           "experiment.max_new_tokens": 8, "experiment.cost_steps": 1,
                           "experiment.table1": ["erm", "lora-sft", "cot-distill", "pcgrad", "iga"],
                           "experiment.table2": ["iga-random-pairing", "iga-instance-split", "iga-n2"],
                           "methods.pcgrad": {"kind": "pareto_gs"}})
    experiment_flow("params.yaml")
    changed = {k for k in results if experiment_result(*k).stat().st_mtime_ns != mtimes[k]}
    assert changed == {("pcgrad", 0), ("pcgrad", 1)}
    assert len(client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")) == 18
