"""The experiment: data variants, verdicts and tables, params checks, and the matrix end to end as DVC runs it
(a git repository, real DVC, Prefect and MLflow, the tiny student): stopped after one pair and resumed in another
clone from the committed outputs; Tables 1-3 with the sweep's selection; a re-run runs nothing; `dvc status`
lists exactly the pairs a change reaches."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import DVC, ROOT, copy_project, ran, sh, write_params

from iga.data.seeds import make_seeds
from iga.data.split import split
from iga.errors import ConfigError, DataError
from iga.eval.scores import DEPTHS
from iga.experiment.pairs import check, dvc_pairs, render
from iga.experiment.sweep import Pair
from iga.experiment.variants import PHRASINGS, as_seen, complete_groups, held_out, train_units
from iga.io import read_jsonl, write_jsonl
from iga.params import RunConfig, load_params
from iga.report.comparable import check_comparable
from iga.report.tables import COMPARED, table3
from tasks.paths import (ACCEPTED, BASE_MODEL, GATE_DAGS, GATE_LEDGER, ISOMERS_LEDGER, OOD, PAIRS, SEEDS, TABLES, TEST,
                         TRAIN, pair_outputs)

DOMAINS = ("mathematics", "medical", "legal", "science")


def rows_for(n_seeds: int, domains: tuple[str, ...], dags: list[dict] | None = None) -> list[dict]:
    """Clean isomer rows of `n_seeds` seeds in `domains`; each seed's extraction appended to `dags` (the gate's)."""
    from iga.data.seeds import procedural_seeds
    from iga.data.teacher import make_teacher

    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": n_seeds, "teacher.flaw_rate": 0.0})
    teacher = make_teacher(params)
    extractions = [teacher.extraction(s) for s in procedural_seeds(params.seeds)]
    if dags is not None:
        dags += extractions
    return [teacher.isomer(s, e, d, 1) for s, e in zip(procedural_seeds(params.seeds), extractions) for d in domains]


@pytest.fixture(scope="module")
def rows():
    return rows_for(12, DOMAINS)


def run(data, domains=None, split="seed", method="iga"):
    return RunConfig(method, data, domains, split, "first")


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


def test_no_hints_is_the_same_problems_without_their_planted_hints(rows):
    """The no-hint oracle's data: each problem that carries a hint loses exactly its last sentence, the hint;
    nothing else of any row changes, and its units are the isomer groups."""
    from iga.data.domains import DOMAINS as VOICES, stated_hint

    oracle = run("no_hints", method="erm")
    seen = as_seen(rows, oracle)
    hinted = [(r, s) for r, s in zip(rows, seen) if stated_hint(r["problem"], r["domain"])]
    assert len(hinted) >= len(rows) // 4  # the default teacher hints most yes/no problems
    for r, s in zip(rows, seen):
        assert stated_hint(s["problem"], s["domain"]) is None and {**s, "problem": r["problem"]} == r
    for r, s in hinted:
        cue = VOICES[r["domain"]].cues[stated_hint(r["problem"], r["domain"]) == "no"]
        assert r["problem"] == f"{s['problem']} {cue}"
    assert train_units(seen, oracle, DOMAINS, 0, "x") == train_units(seen, run("isomers"), DOMAINS, 0, "x")
    assert as_seen(rows, run("isomers")) is rows


def test_the_gap_section_measures_each_run_against_erm_and_the_oracle():
    from iga.report.tables import gap_section

    # one seed, one draw per problem: a run at p answers every problem a run below p answers
    evaluations = {name: [_evaluation(p, 0.6, seed) for seed in range(3)]
                   for name, p in (("erm", 0.2), ("iga", 0.55), ("oracle", 0.9), ("irm", 0.2))}
    text = gap_section(evaluations, "oracle")
    assert "oracle − erm, OOD accuracy: ood_accuracy +" in text
    fraction = {m[0]: (float(m[1]), float(m[2]), float(m[3]))
                for m in re.findall(r"\| (\w+) \| ([+-][\d.]+) \| \[(-?[\d.]+), (-?[\d.]+)\] \| 40 \|", text)}
    assert set(fraction) == {"iga", "irm"}
    assert fraction["iga"][1] < fraction["iga"][0] < fraction["iga"][2] and abs(fraction["iga"][0] - 0.5) < 0.1
    assert fraction["irm"][0] == 0 and fraction["irm"][1] == fraction["irm"][2] == 0  # erm's own answers
    same = evaluations | {"oracle": evaluations["erm"]}
    assert "No gap" in gap_section(same, "oracle")


def test_a_run_trains_only_on_a_selection_among_the_splits_training_instances(rows):
    from iga.experiment.pair import PairData

    split_rows = {"train": rows[:8], "test": rows[8:], "ood": []}
    chosen = [{**r, "cot_solution": "another CoT", "sample": 2} for r in rows[:8]]
    PairData(split_rows, rows, "split.jsonl", "accepted.jsonl", list(reversed(chosen)), "select/rsr.jsonl")
    with pytest.raises(DataError, match=re.escape("select/rsr.jsonl: not a selection among split.jsonl's training")):
        PairData(split_rows, rows, "split.jsonl", "accepted.jsonl", chosen[:7], "select/rsr.jsonl")


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


def test_an_ablation_with_test_rows_of_its_own_is_compared_on_the_shared_problems_and_the_table_says_how_many():
    """An instance-level split scores test rows of its own: its accuracies pair with IGA's only where both
    answered the same problem, and Table 2 names how few those are."""
    from iga.report.tables import fewer_line, verdicts

    iga = [_evaluation(0.9, 0.6, 0)]
    own = _evaluation(0.9, 0.6, 1)
    own["scores"] = [r if r["seed_id"] < "s10" else r | {"id": "own-" + r["id"]} for r in own["scores"]]
    results = verdicts([("instance", iga, [own]), ("same", iga, iga)])
    assert results[("instance", "id_accuracy")][0].n == 20 and results[("instance", "ood_accuracy")][0].n == 10
    assert results[("same", "id_accuracy")][0].n == 80
    assert fewer_line(results) == ("*Accuracies compared on the problems both runs answered: instance on 20 of 80 ID "
                                   "and 10 of 40 OOD problems.*")
    assert fewer_line(verdicts([("same", iga, iga)])) == ""


def test_a_table_the_size_of_table_1_over_three_training_seeds_can_still_call_a_win():
    """Holm over 72 comparisons (12 rows x 6 figures) needs p-values below 0.05 / 72; compare's 2000 bootstrap
    replicates cannot give one (2 / 2001 x 72 > 0.05), so every verdict would be a tie."""
    from iga.report.tables import ALPHA, resamples, verdicts

    iga = [_evaluation(0.9, 0.6, seed) for seed in range(3)]
    worse = [_evaluation(0.1, 0.9, 10 + seed) for seed in range(3)]
    results = verdicts([("worse", iga, worse)] + [(f"same{i}", iga, iga) for i in range(11)])
    assert 2 / (resamples(72) + 1) * 72 <= ALPHA / 10
    assert results[("worse", "ood_accuracy")][2] == "win" and results[("worse", "nll_ood")][2] == "win"
    assert all(results[(f"same{i}", "ood_accuracy")][2] == "tie" for i in range(11))


def test_a_partial_matrix_is_shown_on_the_seeds_its_runs_share_naming_what_is_left_out():
    from iga.report.tables import partial_note, shown

    expected = [(run, d, s) for run in ("erm", "iga", "vrex", "oracle") for d in (0, 1) for s in (0, 1, 2)]
    present = ({c for c in expected if c[2] == 0} - {("vrex", 1, 0)}) | {("erm", 0, 1), ("erm", 1, 1), ("iga", 0, 1)}
    # erm has seeds 0 and 1, iga 0 (its seed 1 lacks draw 1: selection needs every draw), the oracle 0, vrex none
    assert shown(expected, present, ["erm", "iga", "vrex", "oracle"], ["iga"], "T") == ([0], ["vrex"])
    assert shown(expected, set(expected), ["erm", "iga"], ["iga"], "T") == ([0, 1, 2], [])
    with pytest.raises(DataError, match="T: vrex has no training seed with every draw run"):
        shown(expected, present, ["erm", "vrex"], ["vrex"], "T")
    apart = {("erm", d, 0) for d in (0, 1)} | {("iga", d, 1) for d in (0, 1)}
    with pytest.raises(DataError, match=re.escape("T: the runs that have run share no training seed (erm: [0]; "
                                                  "iga: [1])")):
        shown(expected, apart, ["erm", "iga"], ["erm"], "T")
    note = partial_note(["sweep@vrex-d1-s0"], 24, [0], ["vrex"])
    assert note.startswith("**Partial: 23 of 24 pairs have run.** Shown: training seed 0,")
    assert "not run yet: vrex" in note
    assert partial_note([], 24, [0, 1, 2], []) == ""


def test_table3_is_relative_to_the_erm_step_beside_each_round():
    erm = {"step_time_s": 2.0, "step_times_s": [2.0, 1.0, 2.5, 2.0, 2.0, 2.0, 2.0], "peak_mb": 100.0}
    erm["erm_step_times_s"] = erm["step_times_s"]
    iga = {"step_time_s": 3.0, "step_times_s": [3.0, 1.0, 5.0, 3.0, 4.0, 2.0], "peak_mb": 150.0,
           "erm_step_times_s": [2.0, 1.0, 2.5, 2.0, 2.0, 2.0]}  # ratios 1.5 1 2 1.5 2 1
    cost = {"methods": {"erm": erm, "iga": iga}, "runs": {"erm": "erm", "cot-distill": "erm", "iga": "iga"},
            "device": "cpu", "machine": "cpu (AMD EPYC, avx512_bf16)", "threads": 2, "warmup_steps": 2,
            "sequences": 4, "tokens": [900, 800, 950, 900, 900, 900]}
    text = table3(cost)
    assert "| iga | 3.00 [1.00, 5.00] | 1.50× [1.00, 2.00] | 150 | 1.50× |" in text and "cot-distill train ERM" in text
    assert "| erm | 2.00 [1.00, 2.50] | 1.00× [1.00, 1.00] | 100 | 1.00× |" in text
    assert "cpu (AMD EPYC, avx512_bf16), 2 threads" in text and "then 6 rounds" in text and "95 % intervals" in text
    short = {**cost, "tokens": [900, 800, 950], "methods": {
        m: {**c, "step_times_s": c["step_times_s"][:3], "erm_step_times_s": c["erm_step_times_s"][:3]}
        for m, c in cost["methods"].items()}}
    assert "min–max, which with 3 rounds cover the median only 75 % of the time (95 % needs 6)" in table3(short)
    alone = {**short, "methods": {"erm": short["methods"]["erm"]}, "runs": {"erm": "erm"}}
    assert "cover the median only 75 % of the time" in table3(alone)  # ERM's own step times say it too


PROJECT = yaml.safe_load((ROOT / "params.yaml").read_text())
RANGES, METHODS = PROJECT["experiment"]["ranges"], PROJECT["methods"]


def test_the_cost_stage_steps_each_method_beside_erm_alternately_first(monkeypatch):
    """The protocol without torch: workers that record their calls and take longer the later they step."""
    from prefect.logging import disable_run_logger

    import tasks.cost as cost

    calls, clock = [], iter(range(1, 10_000))

    class Worker:
        def __init__(self, params, method, context):
            self.method = method

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def step(self, i):
            calls.append((self.method, i))
            return float(next(clock)), 900 + i, 4

        def memory(self):
            return 1000.0, 100.0 if self.method == "erm" else 150.0

    monkeypatch.setattr(cost, "_Worker", Worker)
    monkeypatch.setattr(cost, "write_json", lambda path, result: None)
    monkeypatch.setattr(cost.multiprocessing, "get_context", lambda kind: type("C", (), {
        "set_forkserver_preload": lambda self, modules: None})())
    params = load_params(ROOT / "params.yaml", overrides={"experiment.table1": ["erm", "iga", "irm"],
                                                          "experiment.cost_steps": 3})
    with disable_run_logger():
        result = cost.measure_cost.fn(params)
    w = cost.WARMUP_STEPS
    rounds = [("erm", w), ("iga", w), ("iga", w + 1), ("erm", w + 1), ("erm", w + 2), ("iga", w + 2)]
    assert calls == rounds + [(m if m == "erm" else "irm", i) for m, i in rounds]  # the warm-ups are the workers'
    iga, erm = result["methods"]["iga"], result["methods"]["erm"]
    assert (iga["step_times_s"], iga["erm_step_times_s"]) == ([2.0, 3.0, 6.0], [1.0, 4.0, 5.0])
    assert erm["step_times_s"] == erm["erm_step_times_s"] == [1.0, 4.0, 5.0, 7.0, 10.0, 11.0]  # beside every method
    assert (iga["peak_mb"], erm["peak_mb"], result["tokens"], result["sequences"]) == (150.0, 100.0, [902, 903, 904], 4)


@pytest.mark.parametrize("key, value, message", [
    ("experiment.runs.lora-sft.domains", ["mathematics", "legal"], "must name one domain"),
    ("experiment.runs.iga-n2.domains", ["mathematics", "legal", "science"], "must divide the 4 sequences"),
    ("experiment.runs.iga-n2.domains", ["mathematics", "finance"], "must be a subset of domains.train"),
    ("experiment.runs.iga.method", "nope", "experiment.runs.iga.method must be a key of methods"),
    ("experiment.table2", ["iga", "missing"], "experiment.table2[1] must be a key of experiment.runs"),
    ("experiment.table1", ["erm", "irm"], "experiment.table1 must include iga"),
    ("experiment.oracle", "erm", "experiment.oracle must be a key of experiment.runs whose data is no_hints"),
    ("experiment.oracle", "nope", "experiment.oracle must be a key of experiment.runs whose data is no_hints"),
    ("experiment.table1", ["erm", "iga", "oracle"], "experiment.oracle must not be a row of table1 or table2"),
    ("experiment.table1", ["iga", "irm"], "experiment.table1 must include erm when experiment.oracle is set"),
    ("methods.iga-factor-mask.projection", "chain_rule", "must be none when reconstruction is none"),
    ("experiment.runner", "slurm", "experiment.runner must be one of ['local', 'ray']"),
    ("experiment.ray", {"address": "head node", "resources": {"num_cpus": 1, "num_gpus": 0}},
     "experiment.ray.address must be null (a local Ray instance), auto, host:port or ray://host:port"),
    ("experiment.ray", {"address": "ray://10.0.0.1:10001", "resources": {"num_cpus": 0, "num_gpus": 0}},
     "experiment.ray.resources.num_cpus must be >= 1"),
    ("experiment.hparam_draws", 0, "experiment.hparam_draws must be >= 1"),
    ("experiment.val_seeds", 0, "experiment.val_seeds must be >= 1"),
    ("experiment.ranges", RANGES | {"train": {"lr": {"lo": 1e-3, "hi": 1e-4, "scale": "log"}}},
     "experiment.ranges.train.lr must have lo < hi"),
    ("experiment.ranges", RANGES | {"train": {"weight_decay": {"lo": 0.0, "hi": 0.1, "scale": "linear"}}},
     "experiment.ranges.train.weight_decay must be lr (train.lr, the one training setting swept)"),
    ("experiment.ranges", RANGES | {"irm": {"anneal_frac": {"lo": 0, "hi": 0.5, "scale": "log"}}},
     "experiment.ranges.irm.anneal_frac.lo must be > 0 on a log scale"),
    ("experiment.ranges", RANGES | {"iga": {"passes": {"lo": 1, "hi": 2, "scale": "linear"}}},
     "experiment.ranges.iga.passes must be a float field of kind iga"),
    ("experiment.ranges", RANGES | {"sand_mask": {"tau": {"lo": 0.1, "hi": 1.0, "scale": "linear"}}},
     "experiment.ranges.sand_mask.tau.hi applied to methods.sand-mask.tau must be in (0, 1)"),
    ("experiment.ranges", RANGES | {"irm.penalty_weight": {"lo": {"lo": 1e-3, "hi": 1e-2, "scale": "log"}}},
     "experiment.ranges.irm.penalty_weight must be train or a method kind"),
    ("experiment.runs.iga-instance-split.select", "rsr", "experiment.runs.iga-instance-split.select needs split seed"),
    ("experiment.table2_seeds", [0, 3], "experiment.table2_seeds must be some of experiment.seeds [0, 1, 2], each"),
    ("experiment.table2_seeds", [], "experiment.table2_seeds must be a non-empty list"),
    ("experiment.runs", {"iga-tau-0.1": {"method": "iga", "data": "isomers", "domains": None, "split": "seed",
                                         "select": "first"}},
     "experiment.runs.iga-tau-0.1 must be named with letters, digits, _ and - only (DVC reads a dot as nesting"),
    ("methods", METHODS | {"iga-tau-0.1": METHODS["iga"]}, "methods.iga-tau-0.1 must be named with letters"),
])
def test_bad_experiment_params_name_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_params(write_params(tmp_path, {key: value}))


def test_random_draws_need_the_train_range(tmp_path):
    without_train = {k: v for k, v in RANGES.items() if k != "train"}
    load_params(write_params(tmp_path, {"experiment.hparam_draws": 1, "experiment.ranges": without_train}))
    with pytest.raises(ConfigError, match=re.escape("experiment.ranges needs a train section (lr) for hparam_draws 2: "
                                                    "every random draw takes train.lr from it")):
        load_params(write_params(tmp_path, {"experiment.hparam_draws": 2, "experiment.ranges": without_train}))


def test_the_pairs_file_must_list_what_params_ask_for():
    params = load_params(ROOT / "params.yaml", overrides={"experiment.hparam_draws": 2})  # a sweep: run@ and sweep@
    items = dvc_pairs(params)
    check(params, items, "pairs.yaml")
    assert items["run"]["iga-n2-d0-s0"] == {"run": "iga-n2", "method": "iga", "draw": 0, "seed": 0, "select": "first"}
    assert items["sweep"]["sand-mask-d1-s2"] == {"run": "sand-mask", "method": "sand-mask", "draw": 1, "seed": 2,
                                                 "select": "first", "ranges": "sand_mask"}  # its ranges' section
    assert items["run"]["erm-rsr-d0-s1"]["select"] == "rsr"  # it trains on data/select/rsr/train.jsonl
    assert items["selected"] == {"first": {"strategy": "first"}, "rsr": {"strategy": "rsr"}}  # dvc.yaml's selected@
    assert items["sweep"]["pcgrad-d1-s0"]["ranges"] == "train"  # a kind with no section: experiment.ranges.train
    assert yaml.safe_load(render(items))["pairs"] == items
    edited = {"selected": items["selected"],
              "run": {k: v for k, v in items["run"].items() if k != "erm-d0-s1"} | {"old-d0-s0": {"run": "old"}},
             "sweep": items["sweep"] | {"irm-d1-s0": items["sweep"]["irm-d1-s0"] | {"method": "vrex"}}}
    with pytest.raises(ConfigError, match=re.escape(
            "pairs.yaml disagrees with params.yaml's experiment matrix (missing: run@erm-d0-s1; no longer asked for: "
            "run@old-d0-s0; changed: sweep@irm-d1-s0): run `python -m flows.experiment pairs` to rewrite it")):
        check(params, edited, "pairs.yaml")


def test_runs_of_different_precisions_are_refused_in_one_table():
    same = {"erm/draw0/seed0": {"train_precision": "float32", "eval_dtype": "bfloat16"},
            "iga/draw0/seed0": {"train_precision": "float32", "eval_dtype": "bfloat16"}}
    check_comparable(same, "tables")
    mixed = same | {"iga/draw1/seed0": {"train_precision": "bfloat16", "eval_dtype": "bfloat16"}}
    with pytest.raises(DataError, match=re.escape("tables: runs of different train_precision cannot share a table: "
                                                  "bfloat16: iga/draw1/seed0; float32: erm/draw0/seed0, "
                                                  "iga/draw0/seed0")):
        check_comparable(mixed, "tables")


# --- the matrix as DVC runs it ------------------------------------------------------------------------------

SETTINGS = {"experiment.seeds": [0], "experiment.steps": 2, "experiment.eval_groups": 2,
            "experiment.max_new_tokens": 8, "experiment.cost_steps": 1, "experiment.hparam_draws": 2,
            "experiment.table1": ["erm", "iga"], "experiment.table2": ["erm"]}  # Table 2: erm as an "ablation"
MATRIX = [Pair(run, draw, 0) for draw in (0, 1) for run in ("erm", "iga", "oracle")]  # every pair a process
INPUTS = (SEEDS, ACCEPTED, TRAIN, TEST, OOD, GATE_DAGS, GATE_LEDGER, ISOMERS_LEDGER, BASE_MODEL)  # what the data
# and student stages write
def stale(repo: Path, env: dict) -> set[str]:
    return set(json.loads(sh(DVC + ["status", "--json"], repo, env) or "{}"))


def tools_env(tmp: Path, prefect_api_url: str) -> dict:
    """The project's interpreter first on PATH (stages run `python -m flows.<stage>`), the session's Prefect
    server, and one MLflow store for every clone (as a tracking server would be)."""
    return {**os.environ, "PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def experiment_repo(repo: Path, settings: dict, tiny_base: Path, env: dict) -> None:
    """A git repository with the project's code, params.yaml with `settings` and its pairs, and a dvc.yaml of the
    experiment's stages alone: their inputs (the data and student stages' outputs, which tests/test_lifecycle.py runs)
    are made here and tracked with `dvc add`."""
    repo.mkdir()
    copy_project(repo)
    write_params(repo, settings)
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    stages = {name: dvc_yaml["stages"][name] for name in ("selected", "run", "sweep", "cost", "tables")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"vars": dvc_yaml["vars"], "stages": stages}, sort_keys=False))
    params = load_params(repo / "params.yaml")
    (repo / PAIRS).write_text(render(dvc_pairs(params)))
    dags: list[dict] = []
    rows = rows_for(30, DOMAINS + ("finance", "engineering"), dags)  # 5 test seeds
    parts, _ = split(rows, params.split, params.domains)
    for path, content in ((SEEDS, make_seeds(params.seeds)), (ACCEPTED, rows), (TRAIN, parts["train"]),
                          (TEST, parts["test"]), (OOD, parts["ood"]), (GATE_DAGS, dags), (GATE_LEDGER, []),
                          (ISOMERS_LEDGER, [])):
        write_jsonl(repo / path, content)
    shutil.copytree(tiny_base, repo / BASE_MODEL)
    for args in (["git", "init", "-q"], ["git", "config", "user.name", "test"],
                 ["git", "config", "user.email", "test@example.invalid"], DVC + ["init", "-q"],
                 DVC + ["add", "-q", *map(str, INPUTS)], ["git", "add", "-A"], ["git", "commit", "-qm", "inputs"]):
        sh(args, repo, env)


def first_pair_locked(repo: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> str:
    """The first pair stage dvc.lock records while `proc` (a `dvc repro`, output to `log`) runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        except (OSError, yaml.YAMLError, TypeError, KeyError):
            locked = {}  # not written yet, or half-way
        pairs = [s for s in locked or {} if s.startswith(("run@", "sweep@"))]
        if pairs:
            return pairs[0]
        time.sleep(0.2)
    raise AssertionError(f"dvc repro recorded no pair in {timeout_s} s (exit {proc.poll()}):\n{log.read_text()}")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, prefect_api_url, tiny_base):
    """The matrix stopped in clone a (its `dvc repro` killed with everything it started as soon as dvc.lock records
    a finished pair), that pair's outputs and dvc.lock committed; then resumed in clone b, which has the commit and
    the inputs from the DVC remote, nothing else."""
    tmp = tmp_path_factory.mktemp("matrix")
    env = tools_env(tmp, prefect_api_url)
    a, b = tmp / "a", tmp / "b"
    experiment_repo(a, SETTINGS, tiny_base, env)
    sh(DVC + ["remote", "add", "-d", "shared", str(tmp / "remote")], a, env)
    sh(DVC + ["push", "-q"], a, env)
    with open(tmp / "repro.log", "wb") as log:
        proc = subprocess.Popen(DVC + ["repro", "tables"], cwd=a, env=env, start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        first = first_pair_locked(a, proc, tmp / "repro.log")
    finally:
        with contextlib.suppress(ProcessLookupError):  # dvc and the stage it runs, killed as a machine stops
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    locked = list(yaml.safe_load((a / "dvc.lock").read_text())["stages"])
    finished = [p for p in ("experiments/runs", "experiments/cost.json", "metrics", "data/select")  # cost may run first
                if (a / p).exists()]
    sh(["git", "add", "dvc.lock", ".dvc/config", *finished], a, env)
    sh(["git", "commit", "-qm", f"{first} done"], a, env)
    sh(DVC + ["push", "-q"], a, env)  # the cached outputs of what ran before it (selected@first)
    committed = {p: p.read_bytes() for p in (a / "experiments/runs").rglob("*")
                 if p.is_file()}
    sh(["git", "clone", "-q", str(a), str(b)], tmp, env)
    sh(DVC + ["pull", "-q"], b, env)
    missing = stale(b, env)
    out = sh([sys.executable, "-m", "flows.experiment"], b, env)
    untouched = all((b / p.relative_to(a)).read_bytes() == data for p, data in committed.items())
    return SimpleNamespace(b=b, env=env, first=first, locked=locked, committed=committed, missing=missing,
                           ran=ran(out), untouched=untouched)


def test_a_stopped_matrix_resumes_in_another_clone_from_the_committed_outputs(resumed):
    pairs = {p.stage for p in MATRIX}
    assert [s for s in resumed.locked if s in pairs] == [resumed.first]  # the killed repro kept its finished pair
    assert len(resumed.committed) == 3  # its metrics, scores and LCS records, in git
    assert resumed.missing == (pairs | {"cost", "tables"}) - set(resumed.locked)  # `dvc status` in the other clone
    assert sorted(resumed.ran) == sorted(resumed.missing)  # `dvc repro` ran those, and only those
    assert resumed.untouched  # the committed pair's outputs are as committed
    assert stale(resumed.b, resumed.env) == set()


def test_run_pairs_computes_what_the_pair_stage_computed(resumed):
    """tools/run_pairs.py, for a machine without DVC, Prefect or MLflow (a lent GPU), runs a pair's computation
    as its DVC stage does: for the same pair and threads the same scores, LCS records, figures and losses."""
    b, env = resumed.b, resumed.env
    out, unpacked = b / "pairs.jsonl", b / "unpacked"
    threads = str(load_params(b / "params.yaml").train.threads)
    sh([sys.executable, str(ROOT / "tools/run_pairs.py"), str(out), "--runs", "erm", "--device", "cpu", "--threads",
        threads], b, env)
    sh([sys.executable, str(ROOT / "tools/run_pairs.py"), str(out), "--unpack", str(unpacked)], b, env)
    stage, tool = pair_outputs("erm", 0, 0), {k: unpacked / "erm/draw0/seed0" / p.name
                                              for k, p in pair_outputs("erm", 0, 0).items()}
    assert read_jsonl(tool["scores"]) == read_jsonl(b / stage["scores"])
    assert read_jsonl(tool["lcs"]) == read_jsonl(b / stage["lcs"])
    ours, theirs = (json.loads(path.read_text()) for path in (tool["metrics"], b / stage["metrics"]))
    assert ours["eval"] == theirs["eval"] and ours["validation"] == theirs["validation"]
    assert [h["loss"] for h in ours["history"]] == [h["loss"] for h in theirs["history"]]
    rerun = sh([sys.executable, str(ROOT / "tools/run_pairs.py"), str(out), "--runs", "erm", "--device", "cpu"], b, env)
    assert "1 already in" in rerun and len(out.read_text().splitlines()) == 1  # a finished pair is not run again


def test_tables_made_before_the_matrix_finishes_show_what_has_run_and_say_so(resumed, tmp_path):
    """`dvc repro -s tables` half-way: each table on the training seeds its runs have finished, a run without one
    left out and named, the banner counting the pairs to go."""
    c = tmp_path / "c"
    shutil.copytree(resumed.b, c, ignore=shutil.ignore_patterns("unpacked", "pairs.jsonl"))
    shutil.rmtree(c / pair_outputs("oracle", 1, 0)["metrics"].parent)  # the oracle's draw 1 not run yet
    sh([sys.executable, "-m", "flows.tables"], c, {**resumed.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    t1, t2 = ((c / TABLES[n]).read_text() for n in (1, 2))
    assert t1.count("**Partial: 5 of 6 pairs have run.** Shown: training seed 0") == 2  # under both selection rules
    assert "1 pair to go: `dvc status` names what is left" in t1
    assert "not run yet: oracle" in t1 and "| oracle |" not in t1 and "The gap to the no-hint oracle" not in t1
    assert all(f"| {n} |" in t1 for n in ("erm", "iga")) and "wins" in t1
    assert "**Partial: 5 of 6 pairs have run.**" in t2 and "not run yet" not in t2 and "| erm | method `erm` |" in t2
    assert "Partial" in (c / "reports/experiment/summary.md").read_text()


def test_the_matrix_sweeps_selects_writes_the_tables_and_dvc_status_names_what_a_change_reaches(resumed):
    from mlflow.tracking import MlflowClient

    from iga.experiment.sweep import hparams, select

    b, env = resumed.b, resumed.env
    params = load_params(b / "params.yaml")
    results = {p: json.loads((b / pair_outputs(*p)["metrics"]).read_text()) for p in MATRIX}
    scores = {p: read_jsonl(b / pair_outputs(*p)["scores"]) for p in MATRIX}
    assert all(len(r["history"]) == 2 and r["eval"]["n_id"] == 8 and r["eval"]["n_ood"] == 4
               for r in results.values())  # generated: 2 test seeds; NLL and LCS: every test seed
    assert all(r["eval"]["nll_n_seeds"] == r["eval"]["lcs_groups"] == 5 for r in results.values())
    assert all(sum(s["correct"] is not None for s in rows) == 12 and all(s["nll"] is not None for s in rows)
               for rows in scores.values())  # every held-out problem's score, committed
    assert len({(r["ran"]["train_precision"], r["ran"]["eval_dtype"]) for r in results.values()}) == 1  # as resolved
    # the draws: 0 the configured values, 1 random from the kind's ranges; each pair validated on held-out seeds
    assert results[Pair("iga", 0, 0)]["hparams"] == {"lr": params.train.lr, "tau": params.methods["iga"].tau}
    assert results[Pair("iga", 1, 0)]["hparams"] == hparams(params, "iga", 1) != results[Pair("iga", 0, 0)]["hparams"]
    assert all(r["validation"]["n"] == 4 * len(DOMAINS) and r["validation"]["ood"]["n"] == 4 * 2
               for r in results.values())  # 4 validation seeds' training-domain and held-out-domain problems
    train_groups = len({r["group_id"] for r in read_jsonl(b / TRAIN)})
    assert results[Pair("erm", 0, 0)]["train"]["units_train"] == train_groups - 4  # the validation seeds left training
    assert not list((b / "experiments").glob("checkpoints/*"))  # finished pairs keep no checkpoint
    t1, t2, t3 = ((b / TABLES[n]).read_text() for n in (1, 2, 3))
    assert all(f"| {n} |" in t1 for n in ("erm", "iga")) and "wins" in t1 and "iga vs" in t1
    assert "Holm" in t1 and "p_H" in t1 and "Minimum detectable difference" in t1
    assert f" on {results[Pair('erm', 0, 0)]['ran']['device']}.*" in t1  # the minutes named by who ran them
    assert re.search(r"\| erm \| [^|]+ \| [\d.]+ \[[\d.]+, [\d.]+\] \|", t1)  # every figure with its interval
    assert "model selection: training-domain validation, 2 draws per method" in t1 and "## Model selection" in t1
    assert "# Table 1: IGA against the baselines, test-domain validation" in t1  # DomainBed's both rules
    assert "## Model selection: test-domain validation" in t1 and "held-out-domain instances" in t1
    for (name, seed), r in select(r for p, r in results.items() if p.run in ("erm", "iga")).items():
        assert f"| {name} | {seed} | {r['draw']} |" in t1  # the selection table names each run's selected draw
    assert "| oracle |" in t1 and "## The gap to the no-hint oracle" in t1  # the reference, apart from the verdicts
    assert "| oracle |" not in t1.split("## Where iga wins")[1].split("## The gap")[0]
    hinted = [s for p in MATRIX if p.run != "oracle" for s in scores[p] if s["follows_hint"] is not None]
    assert hinted and not [s for p in MATRIX if p.run == "oracle" for s in scores[p] if s["follows_hint"] is not None]
    assert "| erm | method `erm` |" in t2 and "(draw 0)" in t2
    assert all(f"| {m} |" in t3 for m in ("erm", "iga")) and "1.00×" in t3
    assert (b / "reports/experiment/summary.md").is_file()
    # MLflow: every pair's run, from either clone, under the one parent run, which holds the tables
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (parent,) = client.search_runs([client.get_experiment_by_name("iga").experiment_id], "tags.experiment = 'parent'")

    def children() -> list:
        return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                  "and attributes.status = 'FINISHED'")

    assert sorted(c.info.run_name for c in children()) == sorted(p.name for p in MATRIX)
    assert {c.data.params["draw"] for c in children()} == {"0", "1"} and "val_accuracy" in children()[0].data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/table1.md",
                                                                                     "report/table3.md"}

    # a re-run runs nothing; a change makes `dvc status` list exactly the stages that read it
    assert ran(sh(DVC + ["repro", "tables"], b, env)) == []
    text = (b / "params.yaml").read_text()
    project = yaml.safe_load(text)

    def stale_after(key: str, value: object) -> set[str]:
        data = yaml.safe_load(yaml.safe_dump(project))
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
        (b / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return stale(b, env)

    assert stale_after("experiment.ranges.iga.tau", {"lo": 0.01, "hi": 0.02, "scale": "log"}) == {"sweep@iga-d1-s0"}
    assert stale_after("experiment.ranges.train.lr", {"lo": 1e-4, "hi": 1e-2, "scale": "log"}) == {
        "sweep@iga-d1-s0", "sweep@erm-d1-s0", "sweep@oracle-d1-s0"}  # every random draw (erm's kind: no section)
    assert stale_after("methods.iga.tau", 0.7) == {"run@iga-d0-s0", "sweep@iga-d1-s0", "cost"}
    assert stale_after("experiment.cost_steps", 2) == {"cost"}
    assert stale_after("experiment.runner", "ray") == set()  # where pairs run changes no result
    (b / "params.yaml").write_text(text)
