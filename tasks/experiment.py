"""The experiment's tasks: one (run, seed) trained and evaluated, each method's cost on one batch, the tables.

A run's result file records a hash of everything its numbers depend on; a re-run of the flow skips
every (run, seed) whose file matches (as DomainBed's sweeps skip finished jobs), so a killed matrix
resumes where it stopped and a changed run reruns alone.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.split import split
from iga.data.teacher import make_teacher
from iga.data.verify import make_verifier
from iga.errors import DataError
from iga.eval.evaluate import evaluate_student, for_evaluation
from iga.eval.scores import summarize
from iga.experiment.cost import step_memory, step_time
from iga.experiment.variants import complete_groups, evaluation_sets, run_domains, train_units
from iga.hardware import resolve_device, resolve_precision
from iga.io import atomic_write_text, read_jsonl, write_json
from iga.params import Params, TrainParams
from iga.report.report import RunResult, write_report
from iga.report.tables import table1, table2, table3
from iga.stages import fingerprint
from iga.train.loop import summarize as summarize_training
from iga.train.loop import train, trainable
from iga.train.methods import build_method
from iga.train.sft import batcher, collate, encode_groups
from iga.train.student import load_student
from tasks import tracking
from tasks.paths import (ACCEPTED, BASE_MODEL, EXPERIMENT, EXPERIMENT_REPORT, OOD, SEEDS, TABLES, TEST, TRAIN,
                         experiment_checkpoints, experiment_result)

PARENT = EXPERIMENT / "parent.json"
COST = EXPERIMENT / "cost.json"


def run_train_params(params: Params, seed: int) -> TrainParams:
    return dataclasses.replace(params.train, seed=seed, steps=params.experiment.steps)


def run_hash(params: Params, name: str, seed: int, data: dict[str, str]) -> str:
    """Everything a (run, seed)'s numbers depend on (iga.stages, "experiment-run"), the compute code included."""
    device = resolve_device(params.train.device)
    method = params.methods[params.experiment.runs[name].method]
    return fingerprint("experiment-run", params, name, method=dataclasses.asdict(method), seed=seed, data=data,
                       precision=resolve_precision(params.train.precision, device),  # auto: what this machine runs
                       eval_dtype=resolve_precision(params.eval.dtype, device))


def _parts(params: Params, unit: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """The train/test/OOD rows of a `unit`-level split and the md5 of each file they come from: the
    split stage's outputs when it split by `unit` (the default, seed), else accepted.jsonl split here
    (the instance-level leakage ablation)."""
    if unit == params.split.unit:
        files = {"train": TRAIN, "test": TEST, "ood": OOD}
        return {side: read_jsonl(path) for side, path in files.items()}, {str(p): tracking.data_hash(p)
                                                                           for p in files.values()}
    parts, _ = split(read_jsonl(ACCEPTED), dataclasses.replace(params.split, unit=unit), params.domains)
    return parts, {str(ACCEPTED): tracking.data_hash(ACCEPTED)}


@task(cache_policy=NO_CACHE)
def open_parent(params: Params) -> str:
    """The experiment's parent MLflow run: the one recorded in experiments/parent.json when it exists
    (a resumed matrix keeps its children together), else a new one."""
    mlflow = tracking.mlflow_module()
    if PARENT.is_file():
        run_id = json.loads(PARENT.read_text())["mlflow_run_id"]
        try:
            mlflow.MlflowClient().get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            get_run_logger().warning("%s names MLflow run %s, which this tracking server lacks; starting a new one",
                                     PARENT, run_id)
    with mlflow.start_run(run_name="experiment") as run:
        mlflow.set_tags({"git_commit": tracking.git_commit(), "experiment": "parent"})
        mlflow.log_params(tracking.flat_params("experiment", {k: v for k, v in dataclasses.asdict(params.experiment)
                                                              .items() if k != "runs"}))
    write_json(PARENT, {"mlflow_run_id": run.info.run_id})
    return run.info.run_id


@task(cache_policy=NO_CACHE)
def run_one(params: Params, name: str, seed: int, parent_run_id: str) -> dict[str, Any]:
    """Train `name` with `seed` for experiment.steps and evaluate it; skipped when already done."""
    log = get_run_logger()
    run, tp, ex = params.experiment.runs[name], run_train_params(params, seed), params.experiment
    seed_level, seed_md5s = _parts(params, "seed")
    parts, md5s = (seed_level, seed_md5s) if run.split == "seed" else _parts(params, run.split)
    data = seed_md5s | md5s  # LCS is measured on the seed-level test groups whatever the run's split
    key, path = run_hash(params, name, seed, data), experiment_result(name, seed)
    if path.is_file() and json.loads(path.read_text()).get("params_hash") == key:
        log.info("%s seed %d: done (params hash %s), skipped", name, seed, key)
        return json.loads(path.read_text())
    torch.set_num_threads(tp.threads)
    device = resolve_device(tp.device)
    domains = run_domains(run, params.domains.train)
    source = next(iter(md5s))
    units = train_units(complete_groups(parts["train"], params.domains.train), run, params.domains.train, seed, source)
    model, tokenizer = load_student(BASE_MODEL, params.lora, params.student.dtype, seed=seed)
    model.to(device)
    encoded, too_long = encode_groups(tokenizer, units, tp.max_length)
    if not encoded:
        raise DataError(f"{source}: run {name} has no training unit within train.max_length = {tp.max_length}")
    per_batch = tp.groups_per_batch * len(params.domains.train) // len(encoded[0])  # same sequences for every run
    micro_batches = batcher(encoded, tp, per_batch, tokenizer.pad_token_id)
    method = _build(params, run.method, model, tokenizer, domains)
    n_trainable = sum(p.numel() for p in trainable(model).values())
    mlflow = tracking.mlflow_module()
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=f"{name}/seed{seed}", parent_run_id=parent_run_id) as child:
        mlflow.log_params({"run": name, "seed": seed, **tracking.flat_params("run", run),
                           **tracking.flat_params("method", params.methods[run.method]),
                           **tracking.flat_params("train", tp)})
        mlflow.set_tags({"git_commit": tracking.git_commit(), "params_hash": key,
                         **{f"data_md5.{path}": md5 for path, md5 in data.items()}})
        history = train(model, method, micro_batches, tp, experiment_checkpoints(name, seed), key, device,
                        on_step=lambda r: mlflow.log_metrics({k: v for k, v in r.items() if k != "step"},
                                                             step=int(r["step"])))
        train_s = time.perf_counter() - t0
        test, ood, generate, lcs_rows = evaluation_sets(seed_level, parts, run.split, ex.eval_groups, params.domains,
                                                        source)
        model = for_evaluation(model, params.eval.dtype, device)
        evaluation = evaluate_student(model, tokenizer, test, ood, {}, params.domains.train, to_generate=generate,
                                      max_new_tokens=ex.max_new_tokens, batch_size=params.eval.batch_size,
                                      nll_batch_size=params.eval.nll_batch_size,
                                      lcs_groups=len(lcs_rows), source=source, lcs_rows=lcs_rows)
        metrics = summarize([evaluation], evaluation["lcs_layers"])
        summary = summarize_training(name, history, {"units_train": len(encoded), "units_too_long": too_long,
                                                     "trainable_parameters": n_trainable, "train_s": train_s,
                                                     "eval_s": time.perf_counter() - t0 - train_s})
        mlflow.log_metrics({k: metrics[k] for k in ("id_accuracy", "ood_accuracy", "delta_gap", "nll_id", "nll_ood",
                                                    "nll_gap")}
                           | {"train_s": train_s, "eval_s": summary["eval_s"],
                              "lcs_normalized": metrics["lcs"]["penultimate"]["normalized"]})
        result = {"run": name, "seed": seed, "params_hash": key, "mlflow_run_id": child.info.run_id,
                  "eval": metrics, "evaluation": {"scores": evaluation["scores"], "lcs": evaluation["lcs"]},
                  "lcs_layers": evaluation["lcs_layers"], "train": summary, "history": history}
    write_json(path, result)
    shutil.rmtree(experiment_checkpoints(name, seed))  # the result is written: nothing left to resume
    log.info("%s seed %d: ID %.3f, OOD %.3f, NLL OOD %.3f, LCS %.4f (train %.0f s, eval %.0f s)", name, seed,
             metrics["id_accuracy"], metrics["ood_accuracy"], metrics["nll_ood"],
             metrics["lcs"]["penultimate"]["normalized"], train_s, summary["eval_s"])
    return result


def _build(params: Params, name: str, model: Any, tokenizer: Any, domains: tuple[str, ...]) -> Any:
    """The method `name`; VCD also verifies lines against the seeds' programs (or the teacher)."""
    verifier = None
    if params.methods[name].kind == "vcd":
        verifier = make_verifier(params, read_jsonl(SEEDS), make_teacher(params))
    return build_method(params.methods[name], model, domains, tokenizer, verifier)


def _cost_of(params: Params, method_name: str) -> dict[str, Any]:
    """In a fresh process: a method's step time on the first isomer batch (iga.experiment.cost), the
    median of experiment.cost_steps after a warm-up step, and its peak memory during one step."""
    ex, tp = params.experiment, params.train
    torch.set_num_threads(tp.threads)
    device = resolve_device(tp.device)
    model, tokenizer = load_student(BASE_MODEL, params.lora, params.student.dtype, seed=tp.seed)
    model.to(device)
    rows = complete_groups(read_jsonl(TRAIN), params.domains.train)
    units = train_units(rows, params.experiment.runs["erm"], params.domains.train, tp.seed, str(TRAIN))
    encoded, _ = encode_groups(tokenizer, units, tp.max_length)
    batch = collate(encoded[:tp.groups_per_batch], tokenizer.pad_token_id, seed=0).to(device)
    method = _build(params, method_name, model, tokenizer, params.domains.train)
    times = [step_time(method, batch, device) for _ in range(ex.cost_steps + 1)][1:]  # the first is a warm-up
    peak, extra = step_memory(method, batch, device)
    return {"method": method_name, "step_time_s": statistics.median(times), "step_times_s": times,
            "peak_mb": extra, "peak_total_mb": peak, "device": device.type, "sequences": batch.input_ids.shape[0],
            "tokens": int(batch.attention_mask.sum())}


@task(cache_policy=NO_CACHE)
def measure_cost(params: Params) -> dict[str, Any]:
    """Table 3: each of Table 1's methods on the same batch, one after the other, each in its own process
    (so its peak memory is its own), with the model, data and batch identical."""
    methods = list(dict.fromkeys(params.experiment.runs[r].method for r in params.experiment.table1))
    context = multiprocessing.get_context("spawn")
    costs = {}
    for m in methods:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            costs[m] = pool.submit(_cost_of, params, m).result()
        get_run_logger().info("%s: %.2f s per step, peak +%.0f MB", m, costs[m]["step_time_s"], costs[m]["peak_mb"])
    result = {"methods": costs, "runs": {r: params.experiment.runs[r].method for r in params.experiment.table1}}
    write_json(COST, result)
    return result


@task(cache_policy=NO_CACHE)
def write_tables(params: Params, results: list[dict[str, Any]], cost: dict[str, Any], parent_run_id: str
                 ) -> list[Path]:
    """reports/table1.md, table2.md, table3.md and reports/experiment/ (Table 1's runs, figures), every
    figure with its interval over training seeds and test seeds."""
    ex = params.experiment
    names = list(dict.fromkeys(ex.table1 + ex.table2))
    by_name = {name: sorted((r for r in results if r["run"] == name), key=lambda r: r["seed"]) for name in names}
    evaluations = {name: [r["evaluation"] for r in by_name[name]] for name in names}
    summaries = {name: summarize(evaluations[name], by_name[name][0]["lcs_layers"]) for name in names}
    runs = {name: [RunResult(r["run"], r["seed"], r["eval"], r["train"], r["history"]) for r in by_name[name]]
            for name in names}
    scale = (f"{ex.steps} steps x {params.train.groups_per_batch * len(params.domains.train)} sequences per run, "
             f"{len(ex.seeds)} training seeds ({', '.join(map(str, ex.seeds))}); NLL and LCS on every test seed "
             f"({summaries['iga']['nll_n_seeds']}), accuracy on the first {ex.eval_groups} "
             f"({ex.eval_groups * len(params.domains.train)} ID / {ex.eval_groups * len(params.domains.ood)} OOD "
             f"problems), max_new_tokens {ex.max_new_tokens}, student {params.student.base}")
    t1 = {name: summaries[name] for name in ex.table1}
    written = write_report(EXPERIMENT_REPORT, [r for name in ex.table1 for r in runs[name]], summaries=t1,
                           evaluations={name: evaluations[name] for name in ex.table1},
                           title="Experiment: Table 1's runs", notes=[scale])
    run_s = sum(r["train"]["train_s"] + r["train"]["eval_s"] for r in results)  # training + evaluation, all runs
    texts = {1: table1(t1, {name: evaluations[name] for name in ex.table1}, "iga", scale, run_s),
             2: table2({name: summaries[name] for name in ("iga", *ex.table2)},
                       {name: evaluations[name] for name in ("iga", *ex.table2)}, ex.runs, "iga", scale),
             3: table3(cost)}
    for n, text in texts.items():
        atomic_write_text(TABLES[n], text)
    mlflow = tracking.mlflow_module()
    for path in [*TABLES.values(), *written]:
        mlflow.MlflowClient().log_artifact(parent_run_id, str(path), "report")
    return [*TABLES.values(), *written]
