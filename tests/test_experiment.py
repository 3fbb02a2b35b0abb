"""The experiment: data variants, verdicts and tables, params checks, and `flows.experiment` end to end on
real Prefect and MLflow with the tiny student (a re-run skips every finished run)."""
import json
import re
from collections import Counter

import pytest
import yaml
from conftest import ROOT, write_params

from iga.errors import ConfigError
from iga.eval.scores import DEPTHS
from iga.experiment.variants import PHRASINGS, complete_groups, held_out, train_units
from iga.io import read_jsonl, write_jsonl
from iga.params import RunConfig, load_params
from iga.report.tables import COMPARED, table3
from tasks.paths import ACCEPTED, TABLES, TRAIN, experiment_result

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
    ("experiment.runner", "slurm", "experiment.runner must be one of ['local', 'ray']"),
    ("experiment.ray", {"address": "head node", "resources": {"num_cpus": 1, "num_gpus": 0}},
     "experiment.ray.address must be null (a local Ray instance), auto, host:port or ray://host:port"),
    ("experiment.ray", {"address": "ray://10.0.0.1:10001", "resources": {"num_cpus": 0, "num_gpus": 0}},
     "experiment.ray.resources.num_cpus must be >= 1"),
    ("experiment.hparam_draws", 0, "experiment.hparam_draws must be >= 1"),
    ("experiment.val_seeds", 0, "experiment.val_seeds must be >= 1"),
    ("experiment.ranges", {"lr": {"lo": 1e-3, "hi": 1e-4, "scale": "log"}}, "experiment.ranges.lr must have lo < hi"),
    ("experiment.ranges", {"irm.anneal_frac": {"lo": 0, "hi": 0.5, "scale": "log"}},
     "experiment.ranges.irm.anneal_frac.lo must be > 0 on a log scale"),
    ("experiment.ranges", {"iga.passes": {"lo": 1, "hi": 2, "scale": "linear"}}, "experiment.ranges.iga.passes must be "
     "lr or <kind>.<float field of that kind>"),
    ("experiment.ranges", {"sand_mask.tau": {"lo": 0.1, "hi": 1.0, "scale": "linear"}},
     "experiment.ranges.sand_mask.tau.hi applied to methods.sand-mask.tau must be in (0, 1)"),
])
def test_bad_experiment_params_name_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_params(write_params(tmp_path, {key: value}))


def test_experiment_flow_sweeps_selects_writes_the_tables_and_resumes(prefect_api_url, workdir):
    from mlflow.tracking import MlflowClient

    from flows.experiment import experiment_flow
    from flows.split import split_flow
    from flows.student import student_flow
    from iga.experiment.sweep import hparams, select

    settings = {"experiment.seeds": [0, 1], "experiment.steps": 2, "experiment.eval_groups": 2,
                "experiment.max_new_tokens": 8, "experiment.cost_steps": 1, "experiment.hparam_draws": 2,
                "experiment.table1": ["erm", "pcgrad", "iga"],
                "experiment.table2": ["iga-random-pairing", "iga-instance-split", "iga-n2"]}
    write_params(workdir, settings)
    write_jsonl(ACCEPTED, rows_for(30, DOMAINS + ("finance", "engineering")))  # 5 test seeds
    split_flow("params.yaml")  # the runs read the split stage's outputs, as `dvc repro experiment` gives them
    student_flow("params.yaml")
    experiment_flow("params.yaml")
    params = load_params("params.yaml")
    pairs = [(n, d, s) for n in ("erm", "pcgrad", "iga") for d in (0, 1) for s in (0, 1)] + \
        [(n, 0, s) for n in ("iga-random-pairing", "iga-instance-split", "iga-n2") for s in (0, 1)]
    results = {k: json.loads(experiment_result(*k).read_text()) for k in pairs}
    assert all(len(r["history"]) == 2 and r["eval"]["n_id"] == 8 and r["eval"]["n_ood"] == 4
               for r in results.values())  # generated: 2 test seeds; NLL and LCS: every test seed
    assert all(r["eval"]["nll_n_seeds"] == r["eval"]["lcs_groups"] == 5 for n, r in results.items()
               if n[0] != "iga-instance-split")
    assert len({r["params_hash"] for r in results.values()}) == len(pairs)
    # the draws: 0 the configured values, 1 random from the ranges; each run validated on the held-out seeds
    assert results[("iga", 0, 0)]["hparams"] == {"lr": params.train.lr, "tau": params.methods["iga"].tau}
    assert results[("iga", 1, 1)]["hparams"] == hparams(params, "iga", 1) != results[("iga", 0, 1)]["hparams"]
    assert all(r["validation"]["n"] == 4 * len(DOMAINS) for r in results.values())
    train_groups = len({r["group_id"] for r in read_jsonl(TRAIN)})
    assert results[("erm", 0, 0)]["train"]["units_train"] == train_groups - 4  # the validation seeds left training
    assert not list((workdir / "experiments").glob("runs/*/*/*.checkpoints"))  # finished runs keep no checkpoint
    t1, t2, t3 = (TABLES[n].read_text() for n in (1, 2, 3))
    assert all(f"| {n} |" in t1 for n in ("erm", "pcgrad", "iga")) and "wins" in t1 and "iga vs" in t1
    assert "Holm" in t1 and "p_H" in t1 and "Minimum detectable difference" in t1
    assert re.search(r"\| erm \| [^|]+ \| [\d.]+ \[[\d.]+, [\d.]+\] \|", t1)  # every figure with its interval
    assert "model selection: training-domain validation, 2 draws per method" in t1 and "## Model selection" in t1
    chosen = select(r for k, r in results.items() if k[0] in ("erm", "pcgrad", "iga"))
    for (name, seed), r in chosen.items():  # the selection table names each (run, seed)'s selected draw
        assert f"| {name} | {seed} | {r['draw']} |" in t1
    assert "| iga-n2 | domains mathematics, legal |" in t2 and "instance-level split" in t2 and "(draw 0)" in t2
    assert all(f"| {m} |" in t3 for m in ("erm", "pcgrad", "iga")) and "| erm | " in t3 and "1.00×" in t3
    assert (workdir / "reports/experiment/summary.md").is_file()
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    parent = json.loads((workdir / "experiments/parent.json").read_text())["mlflow_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == len(pairs) and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.params["draw"] for c in children} == {"0", "1"} and "val_accuracy" in children[0].data.metrics
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/table1.md", "report/table3.md"}

    # resumable per draw: a re-run trains nothing; a changed range reruns only the draws it reaches
    mtimes = {k: experiment_result(*k).stat().st_mtime_ns for k in results}
    write_params(workdir, settings | {"experiment.ranges": {**yaml.safe_load((workdir / "params.yaml").read_text())
                                                                ["experiment"]["ranges"],
                                                                "iga.tau": {"lo": 0.01, "hi": 0.02, "scale": "log"}}})
    experiment_flow("params.yaml")
    changed = {k for k in results if experiment_result(*k).stat().st_mtime_ns != mtimes[k]}
    assert changed == {("iga", 1, 0), ("iga", 1, 1)}
    assert len(client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")) == len(pairs) + 2
