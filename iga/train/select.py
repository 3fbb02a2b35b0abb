"""Which teacher trajectory to learn from: each candidate CoT scored under the base student by the
Rank-Surprisal Ratio (iga/rsr.py), in the training chat template, on the completion tokens only
(the tokens training puts a loss on), and one candidate kept per training instance.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np

from iga.params import SelectParams
from iga.stats import cluster_bootstrap_ci

SCORES = ("rsr", "avg_rank", "avg_nll")


def score_trajectories(model: Any, tokenizer: Any, texts: Sequence[tuple[str, str]], batch_size: int, clip: int,
                       on_batch: Callable[[int], None] = lambda n: None) -> list[dict[str, float]]:
    """{rsr, avg_rank, avg_nll, tokens} of each (problem, cot) under `model`, from the teacher-forced pass
    evaluation uses (iga.train.forced). A text given twice is scored once: samples often come out word for word
    the same, and scored in different batches their scores would differ in the last bits, by the CPU's summation
    order, so which of the twins `choose` keeps would depend on the machine (docs/measured.md)."""
    from iga.train.forced import teacher_forced  # torch: not for choosing, which the stage does without a model

    distinct = list(dict.fromkeys(texts))
    scored = {text: {"rsr": f.rank / f.nll, "avg_rank": f.rank / f.tokens, "avg_nll": f.nll / f.tokens,
                     "tokens": f.tokens}
              for text, f in zip(distinct, teacher_forced(model, tokenizer, distinct, batch_size, rank_clip=clip,
                                                          on_batch=on_batch))}
    return [dict(scored[text]) for text in texts]


def choose(candidates: list[dict[str, Any]], params: SelectParams, key: str) -> int:
    """The index of the candidate an instance keeps (candidates: eligible ones, its own CoT first, each
    with its scores). rsr and nll keep the lowest (the more informative, the more surprising); ties go
    to the earlier candidate. `key` names the instance: random draws are independent of the order
    instances are visited in."""
    if params.strategy == "first":
        return 0
    if params.strategy == "random":
        return random.Random(f"{params.seed}:{key}").randrange(len(candidates))
    field = "rsr" if params.strategy == "rsr" else "avg_nll"
    return min(range(len(candidates)), key=lambda i: (candidates[i][field], i))


def dataset_scores(rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Dataset-level RSR (mean of the trajectories' mean ranks over the mean of their mean NLLs), mean
    rank and mean NLL, each with its 95 % interval from resampling isomer groups (a group's instances
    share one logic), and how many trajectories and groups they rest on."""
    values = np.array([[r["avg_rank"], r["avg_nll"]] for r in rows], dtype=float)
    groups = [r["group_id"] for r in rows]
    out: dict[str, Any] = {"trajectories": len(rows), "groups": len(set(groups))}
    for name, stat in (("rsr", lambda v: v[:, 0].mean() / v[:, 1].mean()), ("mean_rank", lambda v: v[:, 0].mean()),
                       ("mean_nll", lambda v: v[:, 1].mean())):
        est, lo, hi = cluster_bootstrap_ci(values, groups, stat=stat, seed=seed)
        out[name] = {"estimate": est, "ci95": [lo, hi]}
    return out
