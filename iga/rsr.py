"""Rank-Surprisal Ratio (RSR): how informative a teacher trajectory is for a given student.

"Which Reasoning Trajectories Teach Students to Reason Better? A Simple Metric of Informative
Alignment" (arXiv 2601.14249): the trajectories that teach best are surprising to the student (high
negative log-likelihood) while staying among the tokens it already ranks highly (low rank). Per
token, under the student: rank = 1 + how many vocabulary entries have a strictly greater logit than
the target (ties do not push a token down), clipped at `clip`; NLL = −log softmax(logits)[target].

    trajectory RSR = Σ rank / Σ NLL                                   (over the trajectory's tokens)
    dataset RSR    = mean over trajectories of their mean rank
                     / mean over trajectories of their mean NLL

Lower is better. Plain tensor functions: which tokens are scored (the completion, in the training
chat template) is the caller's choice, marked by `ignore_index` in `targets`.
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # the label of a token that is not scored (prompt, padding), as in iga.train.sft


def token_rank_nll(logits: Tensor, targets: Tensor, clip: int = 100, ignore_index: int = IGNORE
                   ) -> tuple[Tensor, Tensor]:
    """(ranks, nlls), each shaped like `targets` (..., T), for logits (..., T, V) that predict them.
    A position whose target is `ignore_index` gets rank 0 and NLL 0, so that it adds nothing to a sum."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not predict targets {tuple(targets.shape)}")
    if clip < 1:
        raise ValueError(f"clip must be >= 1, got {clip}")
    scored = targets != ignore_index
    safe = targets.masked_fill(~scored, 0).unsqueeze(-1)
    logits = logits.float()
    target_logit = logits.gather(-1, safe)
    ranks = ((logits > target_logit).sum(dim=-1) + 1).clamp(max=clip)
    nlls = -torch.log_softmax(logits, dim=-1).gather(-1, safe).squeeze(-1)
    return ranks.masked_fill(~scored, 0), nlls.masked_fill(~scored, 0.0)


def trajectory_rsr(ranks: Tensor, nlls: Tensor) -> Tensor:
    """Σ rank / Σ NLL over the last dimension: one trajectory's RSR (a batch's, one per row)."""
    return ranks.float().sum(dim=-1) / nlls.sum(dim=-1)


def dataset_rsr(ranks: Tensor, nlls: Tensor, scored: Tensor) -> float:
    """Mean over trajectories (rows) of their mean rank, divided by the mean over trajectories of their
    mean NLL; `scored` marks each row's scored tokens (targets != ignore_index)."""
    counts = scored.sum(dim=-1)
    if bool((counts == 0).any()):
        raise ValueError("a trajectory has no scored token")
    mean_rank = (ranks.float().sum(dim=-1) / counts).mean()
    mean_nll = (nlls.sum(dim=-1) / counts).mean()
    return float(mean_rank / mean_nll)
