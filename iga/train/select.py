"""Which teacher trajectory to learn from: each candidate CoT scored under the base student by the
Rank-Surprisal Ratio (iga/rsr.py), in the training chat template, on the completion tokens only
(the tokens training puts a loss on), and one candidate kept per training instance.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch

from iga.params import SelectParams
from iga.rsr import token_rank_nll
from iga.stats import cluster_bootstrap_ci
from iga.train.sft import IGNORE, collate, encode

SCORES = ("rsr", "avg_rank", "avg_nll")


@torch.no_grad()
def score_trajectories(model: Any, tokenizer: Any, texts: Sequence[tuple[str, str]], batch_size: int, clip: int,
                       on_batch: Callable[[int], None] = lambda n: None) -> list[dict[str, float]]:
    """{rsr, avg_rank, avg_nll, tokens} of each (problem, cot) under `model`: batched forward passes over
    rows of similar length, the vocabulary projection only where a completion token is predicted."""
    encoded = [encode(tokenizer, problem, cot) for problem, cot in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids), reverse=True)
    out: list[dict[str, float]] = [{}] * len(encoded)
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([[encoded[i]] for i in idx], tokenizer.pad_token_id, seed=0).to(device)
        labels = batch.labels[:, 1:]
        labelled = labels != IGNORE
        keep = torch.cat([labelled, labelled.new_zeros(labelled.shape[0], 1)], dim=1)  # position t predicts t + 1
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
        ranks, nlls = token_rank_nll(logits.reshape(-1, logits.shape[-1]), labels[labelled], clip)
        rows = labelled.nonzero()[:, 0]
        rank_sum = torch.zeros(len(idx), dtype=torch.float64).index_add(0, rows.cpu(), ranks.double().cpu())
        nll_sum = torch.zeros(len(idx), dtype=torch.float64).index_add(0, rows.cpu(), nlls.double().cpu())
        counts = labelled.sum(dim=1).cpu()
        for j, i in enumerate(idx):
            n = int(counts[j])
            out[i] = {"rsr": float(rank_sum[j] / nll_sum[j]), "avg_rank": float(rank_sum[j]) / n,
                      "avg_nll": float(nll_sum[j]) / n, "tokens": n}
        on_batch(len(idx))
    return out


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
