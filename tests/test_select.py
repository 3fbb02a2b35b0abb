"""The select stage: RSR scores under the student (batched = one row at a time = a direct computation),
every strategy's choice, and `flows.select` on real Prefect with the tiny student: `first` hands training
the split's own rows (no student, no teacher), `rsr` keeps each instance's lowest-RSR eligible candidate."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_params
from iga.io import read_jsonl
from iga.params import SelectParams
from iga.rsr import token_rank_nll
from iga.train.select import choose, dataset_scores, score_trajectories
from iga.train.sft import IGNORE, encode
from iga.train.student import load_base
from tasks.paths import selected_outputs


def test_scores_do_not_depend_on_batching_and_match_a_direct_computation(tiny_base):
    from transformers import AutoTokenizer

    model, tokenizer = load_base(tiny_base, "float32"), AutoTokenizer.from_pretrained(tiny_base)
    texts = [("Let x be 3. What is x + 4?", "Step 1: x + 4 = 3 + 4 = 7.\nAnswer: 7"),
             ("Is a greater than b?", "Step 1: a is greater than b.\nAnswer: yes"),
             ("Let y be 10. What is y * 2?", "Step 1: y * 2 = 20.\nStep 2: that is all.\nAnswer: 20")]
    batched = score_trajectories(model, tokenizer, texts, batch_size=3, clip=100)
    single = score_trajectories(model, tokenizer, texts, batch_size=1, clip=100)
    for b, s, (problem, cot) in zip(batched, single, texts):
        assert b["tokens"] == s["tokens"] and b["avg_rank"] == pytest.approx(s["avg_rank"], abs=1e-9)
        assert b["avg_nll"] == pytest.approx(s["avg_nll"], rel=1e-4)
        e = encode(tokenizer, problem, cot)  # the reference: full logits, every position, no batching
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        ranks, nlls = token_rank_nll(logits, torch.tensor(e.labels[1:]))
        n = sum(label != IGNORE for label in e.labels[1:])
        assert s["tokens"] == n and s["avg_rank"] == pytest.approx(float(ranks.sum()) / n)
        assert s["avg_nll"] == pytest.approx(float(nlls.sum()) / n, rel=1e-4)
        assert s["rsr"] == pytest.approx(float(ranks.sum() / nlls.sum()), rel=1e-4)


def test_a_text_given_twice_is_scored_once_so_its_twins_tie_exactly(tiny_base):
    """Samples often come out word for word the same; scored in different batches their scores would differ in
    the last bits, by the CPU's summation order, and which twin is kept would depend on the machine."""
    from transformers import AutoTokenizer

    model, tokenizer = load_base(tiny_base, "float32"), AutoTokenizer.from_pretrained(tiny_base)
    twin = ("Let x be 3. What is x + 4?", "Step 1: x + 4 = 3 + 4 = 7.\nAnswer: 7")
    other = ("Let y be 10. What is y * 2?", "Step 1: y * 2 = 20.\nStep 2: that is all.\nAnswer: 20")
    calls = []
    scores = score_trajectories(model, tokenizer, [twin, other, twin], batch_size=1, clip=100, on_batch=calls.append)
    assert sum(calls) == 2 and scores[0] == scores[2] and scores[0] is not scores[2] and scores[0] != scores[1]
    assert choose([{"rsr": s["rsr"]} for s in (scores[2], scores[0])], SelectParams("rsr", 0, 8, 100), "g|d") == 0


def test_every_strategy_chooses_as_documented():
    cands = [{"rsr": 3.0, "avg_nll": 1.0}, {"rsr": 2.0, "avg_nll": 2.0}, {"rsr": 2.0, "avg_nll": 0.5}]
    pick = {s: choose(cands, SelectParams(s, 0, 8, 100), "g|d") for s in ("first", "rsr", "nll", "random")}
    assert pick["first"] == 0 and pick["rsr"] == 1 and pick["nll"] == 2  # ties go to the earlier candidate
    assert pick["random"] == choose(cands, SelectParams("random", 0, 8, 100), "g|d")  # keyed, not order-dependent


def test_dataset_rsr_is_a_ratio_of_means():
    rows = [{"group_id": g, "avg_rank": r, "avg_nll": n} for g, r, n in (("a", 2.0, 1.0), ("b", 4.0, 3.0))]
    d = dataset_scores(rows)
    assert d["rsr"]["estimate"] == pytest.approx(3.0 / 2.0) and d["groups"] == 2 and d["trajectories"] == 2
    assert d["rsr"]["ci95"][0] <= d["rsr"]["estimate"] <= d["rsr"]["ci95"][1]


@pytest.fixture
def split_project(prefect_api_url, workdir, tiny_base):
    from flows.data import data_flow

    write_params(workdir, {"seeds.n": 12, "teacher.samples": 3, "teacher.flaw_rate": 0.3, "split.test_fraction": 0.4})
    data_flow("params.yaml")
    shutil.copytree(tiny_base, workdir / "models/base")
    return workdir


def test_select_first_hands_training_the_split_rows_and_rsr_the_lowest(split_project, prefect_api_url):
    from flows.select import select_flow

    # first: the split's rows as they are, with neither the student (none here) nor a teacher key (an openai
    # teacher is configured, no OPENAI_API_KEY is set), as `python -m flows.select` runs in the DVC stage
    base = shutil.move("models/base", "base-elsewhere")
    overrides = {"seeds.n": 12, "teacher.samples": 3, "teacher.flaw_rate": 0.3, "split.test_fraction": 0.4}
    write_params(split_project, overrides | {"teacher.provider": "openai"})
    done = subprocess.run([sys.executable, "-m", "flows.select"], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PREFECT_API_URL": prefect_api_url})
    assert done.returncode == 0, done.stderr[-3000:]
    train = read_jsonl("data/split/train.jsonl")
    selected = read_jsonl("data/select/train.jsonl")
    first = json.loads(Path("metrics/select.json").read_text())
    assert first["kept_own"] == len(train) == len(selected) and first["scored_trajectories"] == 0
    for a, b in zip(train, selected):
        assert b == a | {"sample": 0}  # every field of the split's row, unchanged, and nothing scored
    assert read_jsonl("data/select/ledger.jsonl") == []
    shutil.move(base, "models/base")

    # rsr as the experiment's selected@rsr runs it (`python -m flows.select rsr`): beside the demo's, which stays
    write_params(split_project, overrides)
    demo = {path: Path(path).read_bytes() for path in Path("data/select").glob("*.jsonl")}
    metrics = select_flow("params.yaml", strategy="rsr")
    out = selected_outputs("rsr")
    assert {path: Path(path).read_bytes() for path in Path("data/select").glob("*.jsonl")} == demo
    assert json.loads(out["metrics"].read_text()) == metrics and metrics["strategy"] == "rsr"
    selected = read_jsonl(out["train"])
    candidates = read_jsonl(out["candidates"])
    assert len(candidates) == 3 * len(train) and metrics["candidates_sampled"] == 2 * len(train)
    # the training rows carry no scores (their last digits move with the CPU); the candidates do
    assert not any(k in r for r in selected for k in ("rsr", "avg_rank", "avg_nll"))
    assert all(c[k] is not None for c in candidates if c["eligible"] for k in ("rsr", "avg_rank", "avg_nll"))
    for row in selected:
        mine = [c for c in candidates if (c["group_id"], c["domain"]) == (row["group_id"], row["domain"])]
        eligible = [c for c in mine if c["eligible"]]
        kept = next(c for c in mine if c["chosen"])
        assert mine[0]["eligible"] and sum(c["chosen"] for c in mine) == 1
        assert (kept["sample"], kept["cot_solution"]) == (row["sample"], row["cot_solution"])
        if metrics["groups_reverted_step_gate"] == 0:
            best = min(c["rsr"] for c in eligible)
            assert kept["rsr"] == best and kept is next(c for c in eligible if c["rsr"] == best)  # twins: the first
        assert all(c["alignment_score"] >= 0.85 for c in eligible)
    assert metrics["selected"]["rsr"]["estimate"] <= metrics["own"]["rsr"]["estimate"]
    assert metrics["kept_own"] < len(train)  # the samples were worth choosing from
