"""Teacher selection by RSR, and the paper's claim at embedded scale: do teachers whose trajectories
have a lower Rank-Surprisal Ratio under the student teach it better?

Each named teacher (`rank_teachers.teachers`: the procedural teacher with another style or flaw rate)
writes the same training problems; its dataset is scored under the base student (iga.train.select);
in the experiment a student is trained on it (ERM) and scored on the same held-out problems. The
rank correlation between a dataset score and held-out accuracy has an interval from a paired
bootstrap: one draw of training groups and one of test seeds, shared by every teacher.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
from scipy import stats

from iga.data.teacher import make_teacher
from iga.params import Params, SelectParams, TeacherVariant
from iga.train.select import choose

METRICS = ("rsr", "avg_rank", "avg_nll")  # per trajectory; lower is better for each


def variant(params: Params, teacher: TeacherVariant) -> Params:
    return dataclasses.replace(params, teacher=dataclasses.replace(params.teacher, style=teacher.style,
                                                                   flaw_rate=teacher.flaw_rate))


def first_groups(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The rows of the first `n` isomer groups (by group id): every teacher writes the same problems."""
    keep = set(sorted({r["group_id"] for r in rows})[:n])
    return [r for r in rows if r["group_id"] in keep]


def rewrite(params: Params, seeds: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` (instances of the training split) as the teacher of `params` writes them, attempt for attempt."""
    teacher = make_teacher(params)
    out = []
    for r in rows:
        seed = seeds[r["seed_id"]]
        out.append(teacher.isomer(seed, teacher.extraction(seed), r["domain"], r["attempt"]))
    return out


def select_across(datasets: dict[str, list[dict[str, Any]]], strategy: str) -> list[dict[str, Any]]:
    """One dataset from several teachers' scored datasets of the same instances: each instance keeps the
    trajectory with the lowest RSR (strategy rsr) or mean NLL (nll) among the teachers' (trajectory
    selection with the teachers as the candidates)."""
    params = SelectParams(strategy, 0, 1, 1)
    names = list(datasets)
    out = []
    for i in range(len(datasets[names[0]])):
        candidates = [datasets[t][i] for t in names]
        j = choose(candidates, params, "")
        out.append({**candidates[j], "teacher": names[j]})
    return out


def spearman_ci(scores: dict[str, dict[str, np.ndarray]], correct: dict[str, np.ndarray], groups: np.ndarray,
                test_seeds: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """For each metric: Spearman's rho between -metric (dataset level: the mean over trajectories) and
    held-out accuracy across teachers, with a percentile 95 % interval. `scores[teacher][metric]` has one
    value per training trajectory, aligned across teachers (`groups`: each trajectory's isomer group);
    `correct[teacher]` is (training seeds, held-out problems), aligned across teachers (`test_seeds`:
    each problem's test seed, the cluster)."""
    names = list(scores)
    g_ids, g_index = np.unique(groups, return_inverse=True)
    t_ids, t_index = np.unique(test_seeds, return_inverse=True)
    rng = np.random.default_rng(seed)

    def dataset(metric: str, g_weights: np.ndarray) -> np.ndarray:
        w = g_weights[g_index]
        return np.array([-(scores[t][metric] * w).sum() / w.sum() if metric != "rsr" else
                         -((scores[t]["avg_rank"] * w).sum() / (scores[t]["avg_nll"] * w).sum()) for t in names])

    def accuracy(t_weights: np.ndarray) -> np.ndarray:
        w = t_weights[t_index]
        return np.array([(correct[t] * w).sum() / (w.sum() * correct[t].shape[0]) for t in names])

    def rho(x: np.ndarray, y: np.ndarray) -> float:  # nan where a side ties every teacher: no ranking to compare
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            return float(stats.spearmanr(x, y).statistic)

    ones_g, ones_t = np.ones(len(g_ids)), np.ones(len(t_ids))
    acc = accuracy(ones_t)
    out = {}
    for metric in METRICS:
        estimate = rho(dataset(metric, ones_g), acc)
        reps = []
        for _ in range(n_boot):
            gw = np.bincount(rng.integers(0, len(g_ids), len(g_ids)), minlength=len(g_ids)).astype(float)
            tw = np.bincount(rng.integers(0, len(t_ids), len(t_ids)), minlength=len(t_ids)).astype(float)
            r = rho(dataset(metric, gw), accuracy(tw))
            if np.isfinite(r):
                reps.append(r)
        lo, hi = np.percentile(reps, [2.5, 97.5]) if reps else (float("nan"), float("nan"))
        out[metric] = {"rho": estimate, "ci95": [float(lo), float(hi)], "replicates": len(reps)}
    return out
