"""The select stage's I/O: the training instances and their candidate CoTs in, every candidate scored
under the base student (iga.train.select), one kept per instance, out."""
from __future__ import annotations

import time
from pathlib import Path
from collections import Counter, defaultdict
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.answers import extract_answer
from iga.errors import DataError
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from iga.train.select import SCORES, choose, dataset_scores
from tasks.paths import BASE_MODEL, GATE_DAGS, SEEDS, TRAIN

Row = dict[str, Any]
_FROM_CANDIDATE = ("cot_solution", "answer", "flaw", "alignment_score", "step_count")


@task(cache_policy=NO_CACHE)
def read_training() -> list[tuple[Row, Row]]:
    """(seed, row) per training instance; the seed carries the DAG the gate used (the teacher samples
    against it)."""
    seeds = {s["seed_id"]: s for s in read_jsonl(SEEDS)}
    dags = {d["seed_id"]: d["dag"] for d in read_jsonl(GATE_DAGS)}
    rows = read_jsonl(TRAIN)
    if not rows:
        raise DataError(f"{TRAIN}: no training rows")
    jobs = []
    for i, row in enumerate(rows, 1):
        sid = row["seed_id"]
        if sid not in seeds or dags.get(sid) is None:
            raise DataError(f"{TRAIN}:{i}: seed {sid} has no seed in {SEEDS} or no DAG in {GATE_DAGS}")
        jobs.append(({**seeds[sid], "dag": dags[sid]}, row))
    return jobs


def _own_candidates(jobs: list[tuple[Row, Row]]) -> list[list[Row]]:
    """Each instance's own CoT as its only candidate (select.strategy first: no teacher call)."""
    return [[{"sample": 0, "style": None, "error": None, **{k: row[k] for k in _FROM_CANDIDATE}}] for _, row in jobs]


def _ineligible(candidate: Row, min_alignment: float) -> str | None:
    """Why a candidate may not be kept: the instance gate's reasons (candidate 0 passed the gate already)."""
    if candidate["error"]:
        return "teacher_error"
    if candidate["alignment_score"] is None or candidate["alignment_score"] < min_alignment:
        return "low_alignment"
    if extract_answer(candidate["cot_solution"]) is None:
        return "no_answer"
    return None


@task(cache_policy=NO_CACHE)
def choose_and_write(params: Params, jobs: list[tuple[Row, Row]], out: dict[str, Path],
                     candidates: list[list[Row]] | None = None) -> dict[str, Any]:
    """candidates: each instance's candidate CoTs, its own first; None: its own only (select.strategy first).
    Every eligible candidate is scored under the base student, except with strategy first, which keeps the
    own CoT whatever the scores (so the student is not even loaded). `out`: where (tasks.paths.selected_outputs)."""
    log = get_run_logger()
    candidates = candidates or _own_candidates(jobs)
    rows = [row for _, row in jobs]
    reasons: Counter[str] = Counter()
    eligible: list[list[Row]] = []
    for cands in candidates:
        kept = [cands[0]]
        for c in cands[1:]:
            why = _ineligible(c, params.gate.min_alignment)
            reasons[why or "eligible"] += 1
            if why is None:
                kept.append(c)
        eligible.append(kept)

    scoring = params.select.strategy != "first"  # first keeps each instance's own CoT: nothing to score
    flat = [(row, c) for row, cands in zip(rows, eligible) for c in cands]
    scored = _score(params, flat) if scoring else {}

    chosen = [choose(cands, params.select, f"{row['group_id']}|{row['domain']}") for row, cands in zip(rows, eligible)]
    # The group gate holds for what is kept: a group whose kept CoTs' step counts spread too far keeps its own.
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_group[row["group_id"]].append(i)
    reverted = 0
    for members in by_group.values():
        steps = [eligible[i][chosen[i]]["step_count"] for i in members]
        if max(steps) - min(steps) > params.gate.max_step_diff:
            reverted += 1
            for i in members:
                chosen[i] = 0

    # The scores stay in candidates.jsonl: their last digits move with the CPU, and the training rows must not
    selected = [{**row, **{k: cands[j][k] for k in _FROM_CANDIDATE}, "sample": cands[j]["sample"]}
                for row, cands, j in zip(rows, eligible, chosen)]
    write_jsonl(out["train"], selected)
    write_jsonl(out["candidates"], [
        {"group_id": row["group_id"], "seed_id": row["seed_id"], "domain": row["domain"], **c,
         "eligible": any(c is e for e in kept), "chosen": c is kept[j],
         **{k: c.get(k) for k in (*SCORES, "tokens")}}
        for row, cands, kept, j in zip(rows, candidates, eligible, chosen) for c in cands])
    if params.select.strategy == "first":
        write_jsonl(out["ledger"], [])  # no teacher call: candidates are the instances' own CoTs
    metrics = {
        "strategy": params.select.strategy, "samples": len(candidates[0]), "instances": len(rows),
        "groups": len(by_group), "candidates_sampled": sum(len(c) - 1 for c in candidates),
        "candidates_by_outcome": dict(sorted(reasons.items())), "groups_reverted_step_gate": reverted,
        "kept_own": sum(j == 0 for j in chosen), "kept_by_style": dict(Counter(str(c[j]["style"]) for c, j in
                                                                                   zip(eligible, chosen))),
        "scored_trajectories": len(flat) if scoring else 0, **scored,
    }
    if scoring:
        chosen_rows = [{**row, **cands[j]} for row, cands, j in zip(rows, eligible, chosen)]
        metrics |= {"selected": dataset_scores(chosen_rows),
                    "own": dataset_scores([{**row, **cands[0]} for row, cands in zip(rows, eligible)])}
        log.info("select (%s): %d instances, %d candidates scored in %.0f s; kept the own CoT of %d; dataset RSR "
                 "%.3f (own CoTs %.3f) -> %s", params.select.strategy, len(rows), len(flat), metrics["scoring_s"],
                 metrics["kept_own"], metrics["selected"]["rsr"]["estimate"], metrics["own"]["rsr"]["estimate"],
                 out["train"])
    else:
        log.info("select (first): the %d training instances keep their own CoTs -> %s", len(rows), out["train"])
    write_json(out["metrics"], metrics)
    return metrics


def _score(params: Params, flat: list[tuple[Row, Row]]) -> dict[str, Any]:
    """Each (row, candidate)'s RSR, mean rank and mean NLL under the base student, written into the
    candidate; returns how the scoring ran."""
    import torch  # here: with select.strategy first the stage needs neither torch nor the student (~5 s of imports)
    from transformers import AutoTokenizer

    from iga.hardware import describe, resolve_device
    from iga.train.select import score_trajectories
    from iga.train.student import load_base

    torch.set_num_threads(params.train.threads)
    device = resolve_device(params.train.device)
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL)
    model = load_base(BASE_MODEL, params.student.dtype).to(device)
    t0 = time.perf_counter()
    texts = [(row["problem"], c["cot_solution"]) for row, c in flat]
    scores = score_trajectories(model, tokenizer, texts, params.select.batch_size, params.select.rank_clip)
    for (_, c), s in zip(flat, scores):
        c.update(s)
    return {"scoring_s": round(time.perf_counter() - t0, 1), "device": describe(device),
            "rank_clip": params.select.rank_clip, "distinct_trajectories": len(set(texts))}
