"""Teacher selection by dataset RSR (flows.rank_teachers) and its test (flows.rsr_experiment): each named
teacher writes the same training problems, scored under the base student; students trained on each
are scored on the same held-out problems."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from transformers import AutoTokenizer

from iga.errors import ConfigError
from iga.eval.evaluate import decoding, for_evaluation, generate, score
from iga.experiment.teachers import first_groups, rewrite, select_across, spearman_ci, variant
from iga.hardware import describe, resolve_device
from iga.io import atomic_write_text, read_jsonl, write_json
from iga.params import Params
from iga.stats import paired_bootstrap_diff
from iga.train.loop import train
from iga.train.methods import build_method
from iga.train.select import SCORES, dataset_scores, score_trajectories
from iga.train.sft import batcher, encode_groups, isomer_groups
from iga.train.student import load_base, load_student
from tasks.paths import BASE_MODEL, EXPERIMENT, OOD, RSR_CORRELATION, RSR_RESULTS, SEEDS, TEACHER_RANKING, TEST, TRAIN


@task(cache_policy=NO_CACHE)
def score_teachers(params: Params) -> dict[str, dict[str, Any]]:
    """{teacher: {rows, scores (per trajectory), dataset (RSR, mean rank, mean NLL with 95 % intervals)}}."""
    if params.teacher.provider != "procedural":
        raise ConfigError("rank_teachers: the named teachers are procedural variants; set teacher.provider: procedural")
    if "plain" not in params.rank_teachers.teachers:
        raise ConfigError("rank_teachers.teachers: needs a teacher named plain (the reference of the comparisons)")
    log = get_run_logger()
    seeds = {s["seed_id"]: s for s in read_jsonl(SEEDS)}
    rows = first_groups(read_jsonl(TRAIN), params.rank_teachers.groups)
    torch.set_num_threads(params.train.threads)
    device = resolve_device(params.train.device)
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL)
    model = load_base(BASE_MODEL, params.student.dtype).to(device)
    out = {}
    for name, teacher in params.rank_teachers.teachers.items():
        data = rewrite(variant(params, teacher), seeds, rows)
        scores = score_trajectories(model, tokenizer, [(r["problem"], r["cot_solution"]) for r in data],
                                    params.select.batch_size, params.select.rank_clip)
        data = [{**r, **s} for r, s in zip(data, scores)]
        out[name] = {"rows": data, "dataset": dataset_scores(data), "flawed": sum(r["flaw"] is not None for r in data)}
        log.info("teacher %s: dataset RSR %.3f (%d trajectories)", name, out[name]["dataset"]["rsr"]["estimate"], len(data))
    return out


def _interval(x: dict[str, Any]) -> str:
    return f"{x['estimate']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"


@task(cache_policy=NO_CACHE)
def write_ranking(params: Params, scored: dict[str, dict[str, Any]]) -> str:
    ranked = sorted(scored, key=lambda t: scored[t]["dataset"]["rsr"]["estimate"])
    any_ = next(iter(scored.values()))["dataset"]
    lines = ["# Teachers ranked by dataset RSR under the student (lower is better)", "",
             f"{any_['trajectories']} trajectories ({any_['groups']} training isomer groups) per teacher, scored under "
             f"the base student `{params.student.base}` on the completion tokens in the training chat template; "
             "95 % intervals resample isomer groups. Written by `python -m flows.rank_teachers`.", "",
             "| rank | teacher | style | flaw rate | dataset RSR | mean rank | mean NLL | flawed CoTs |",
             "|---|---|---|---|---|---|---|---|"]
    for i, t in enumerate(ranked, 1):
        v, d = params.rank_teachers.teachers[t], scored[t]["dataset"]
        lines.append(f"| {i} | {t} | {v.style} | {v.flaw_rate} | {_interval(d['rsr'])} | {_interval(d['mean_rank'])} | "
                     f"{_interval(d['mean_nll'])} | {scored[t]['flawed']} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(TEACHER_RANKING, text)
    return text


def held_out(params: Params) -> list[dict[str, Any]]:
    """ID and OOD problems of the first rank_teachers.eval_groups test seeds: the same for every student."""
    test = read_jsonl(TEST)
    keep = set(sorted({r["seed_id"] for r in test})[:params.rank_teachers.eval_groups])
    return [r for r in test + read_jsonl(OOD) if r["seed_id"] in keep]


@task(cache_policy=NO_CACHE)
def train_and_answer(params: Params, teacher: str, rows: list[dict[str, Any]], seed: int,
                     problems: list[dict[str, Any]]) -> dict[str, Any]:
    """ERM on one teacher's dataset for rank_teachers.steps, then greedy answers to the held-out problems."""
    tp = dataclasses.replace(params.train, seed=seed, steps=params.rank_teachers.steps)
    torch.set_num_threads(tp.threads)
    device = resolve_device(tp.device)
    model, tokenizer = load_student(BASE_MODEL, params.lora, params.student.dtype, seed=seed)
    model.to(device)
    groups, _ = encode_groups(tokenizer, isomer_groups(rows, params.domains.train, teacher), tp.max_length)
    t0 = time.perf_counter()
    history = train(model, build_method(params.methods["erm"], model, params.domains.train),
                    batcher(groups, tp, tp.groups_per_batch, tokenizer.pad_token_id), tp,
                    EXPERIMENT / "rsr" / f"{teacher}-seed{seed}.checkpoints", f"rsr:{teacher}:{seed}", device)
    model = for_evaluation(model, params.eval.dtype, device)
    how = decoding(params.experiment.max_new_tokens, tokenizer, rows)  # sized from this teacher's own CoTs
    completions = generate(model, tokenizer, [r["problem"] for r in problems], how, params.eval.batch_size)
    correct = score(problems, [c.text for c in completions])
    get_run_logger().info("%s seed %d: held-out accuracy %.3f (%d problems), %.0f s", teacher, seed,
                          float(np.mean(correct)), len(correct), time.perf_counter() - t0)
    return {"teacher": teacher, "seed": seed, "correct": correct, "loss_last": history[-1]["loss"],
            "seconds": time.perf_counter() - t0, "device": describe(device)}


SELECTED = {"rsr-selected": "rsr", "nll-selected": "nll"}  # trajectory selection across the named teachers


@task(cache_policy=NO_CACHE)
def select_across_teachers(scored: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per instance, the lowest-RSR (and, the likelihood baseline, the lowest-NLL) trajectory among the
    named teachers' for it."""
    return {name: select_across({t: v["rows"] for t, v in scored.items()}, strategy)
            for name, strategy in SELECTED.items()}


def _per_problem(correct: np.ndarray) -> np.ndarray:
    """(training seeds, problems) -> each problem's mean over the training seeds."""
    return correct.mean(axis=0)


@task(cache_policy=NO_CACHE)
def write_correlation(params: Params, scored: dict[str, dict[str, Any]], selected: dict[str, list[dict[str, Any]]],
                      runs: list[dict[str, Any]], problems: list[dict[str, Any]]) -> str:
    names = list(scored)
    seeds = params.rank_teachers.seeds
    correct = {t: np.array([[r["correct"] for r in runs if r["teacher"] == t and r["seed"] == s][0] for s in seeds],
                           dtype=float) for t in [*names, *selected]}
    scores = {t: {m: np.array([r[m] for r in scored[t]["rows"]]) for m in SCORES} for t in names}
    groups = np.array([r["group_id"] for r in scored[names[0]]["rows"]])
    rho = spearman_ci(scores, correct, groups, np.array([p["seed_id"] for p in problems]))
    n_id = sum(p["domain_kind"] == "train" for p in problems)
    lines = ["# Does a lower dataset RSR make a better student? (embedded scale)", "",
             f"{len(names)} procedural teachers write the same {scored[names[0]]['dataset']['groups']} training isomer "
             f"groups; ERM trains the student on each for {params.rank_teachers.steps} steps "
             f"(seeds {list(seeds)}); each student answers the same {len(problems)} held-out problems "
             f"({n_id} ID, {len(problems) - n_id} OOD, {params.rank_teachers.eval_groups} test seeds). "
             "Written by `python -m flows.rsr_experiment`.", "",
             "| teacher | dataset RSR | mean rank | mean NLL | held-out accuracy (mean over seeds) [95 % CI] |",
             "|---|---|---|---|---|"]
    for t in sorted(names, key=lambda t: scored[t]["dataset"]["rsr"]["estimate"]):
        d = scored[t]["dataset"]
        acc = _per_problem(correct[t])
        by_seed = {}
        for p, a in zip(problems, acc):
            by_seed.setdefault(p["seed_id"], []).append(a)
        cl = np.array([np.mean(v) for v in by_seed.values()])
        boot = np.random.default_rng(0).choice(cl, (2000, len(cl))).mean(axis=1)
        lines.append(f"| {t} | {_interval(d['rsr'])} | {d['mean_rank']['estimate']:.3f} | "
                     f"{d['mean_nll']['estimate']:.3f} | {acc.mean():.3f} [{np.percentile(boot, 2.5):.3f}, "
                     f"{np.percentile(boot, 97.5):.3f}] |")
    lines += ["", "Spearman's rho across teachers between each dataset score (negated: lower is better, so a positive "
              "rho means the score ranks the teachers as their students rank) and held-out accuracy; 95 % interval "
              "from a paired bootstrap over training groups and test seeds (2000 draws):", "",
              "| dataset score | rho | 95 % CI |", "|---|---|---|"]
    for m, label in (("rsr", "RSR"), ("avg_nll", "mean NLL alone"), ("avg_rank", "mean rank alone")):
        lines.append(f"| {label} | {rho[m]['rho']:.2f} | [{rho[m]['ci95'][0]:.2f}, {rho[m]['ci95'][1]:.2f}] |")
    clusters = [p["seed_id"] for p in problems]
    lines += ["", "Trajectory selection across these teachers: each instance keeps the lowest-RSR (or, the "
              "likelihood baseline, the lowest mean NLL) of the teachers' trajectories for it; ERM on that "
              "dataset, same steps and seeds; held-out accuracy against the plain teacher's student, paired "
              "over the same problems (95 % interval and p from resampling test seeds):", "",
              "| dataset | from each teacher | held-out accuracy | minus plain [95 % CI] | p |", "|---|---|---|---|---|"]
    for name, data in selected.items():
        picked = ", ".join(f"{t} {n}" for t, n in sorted(Counter(r["teacher"] for r in data).items()))
        a, b = _per_problem(correct[name]), _per_problem(correct["plain"])
        delta, lo, hi, p = paired_bootstrap_diff(a, b, clusters)
        lines.append(f"| {name} | {picked} | {a.mean():.3f} | {delta:+.3f} [{lo:+.3f}, {hi:+.3f}] | {p:.2f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(RSR_CORRELATION, text)
    write_json(RSR_RESULTS, {"spearman": rho, "teachers": {t: {"dataset": scored[t]["dataset"],
                                                               "accuracy": float(correct[t].mean())} for t in names},
                             "selected": {n: {"dataset": dataset_scores(d), "accuracy": float(correct[n].mean())}
                                          for n, d in selected.items()},
                             "runs": [{k: v for k, v in r.items() if k != "correct"} | {"accuracy": float(np.mean(r["correct"]))}
                                      for r in runs], "problems": len(problems)})
    return text
