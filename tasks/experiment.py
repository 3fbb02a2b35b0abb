"""The experiment's tasks: each (run, hyperparameter draw, seed) trained and evaluated, in this process or as Ray
tasks; each method's cost on one batch; the tables, with Table 1's draws selected by training-domain validation.

A pair's result file records a hash of everything its numbers depend on, the drawn hyperparameters included;
a re-run of the flow skips every pair whose file matches (as DomainBed's sweeps skip finished jobs), so a
killed matrix resumes where it stopped and a changed run or range reruns alone.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
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
from iga.eval.evaluate import evaluate_student, for_evaluation, generate, score, teacher_forced
from iga.eval.scores import summarize
from iga.experiment.cost import step_memory, step_time
from iga.experiment.sweep import SELECTION, drawn, hold_out, hparams, select, validation, validation_seeds
from iga.experiment.variants import complete_groups, evaluation_sets, run_domains, train_units
from iga.hardware import resolve_device, resolve_precision
from iga.io import atomic_write_text, read_jsonl, write_json
from iga.params import Params, TrainParams
from iga.report.report import RunResult, write_report
from iga.report.tables import selection_table, table1, table2, table3
from iga.stages import fingerprint
from iga.train.loop import summarize as summarize_training
from iga.train.loop import train, trainable
from iga.train.methods import build_method
from iga.train.sft import batcher, collate, encode_groups
from iga.train.student import load_student
from tasks import tracking
from tasks.paths import (
    ACCEPTED,
    BASE_MODEL,
    EXPERIMENT,
    EXPERIMENT_REPORT,
    OOD,
    SEEDS,
    TABLES,
    TEST,
    TRAIN,
    experiment_checkpoints,
    experiment_result,
)

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


Pair = tuple[str, int, int]  # (run, hyperparameter draw, training seed)
Rows = dict[str, list[dict[str, Any]]]  # a split's train/test/ood rows


def _recorded(pair: Pair) -> dict[str, Any] | None:
    path = experiment_result(*pair)
    return json.loads(path.read_text()) if path.is_file() else None


def _inputs(params: Params, pair: Pair) -> tuple[Params, Rows, Rows, str, dict[str, str], str]:
    """What a pair runs on: the params as drawn, the seed-level split and the run's own split, the file its
    training rows come from, the md5 of every data file it reads, and its hash on this machine."""
    name, draw, seed = pair
    params = drawn(params, name, draw)
    unit = params.experiment.runs[name].split
    seed_level, seed_md5s = _parts(params, "seed")
    parts, md5s = (seed_level, seed_md5s) if unit == "seed" else _parts(params, unit)
    data = seed_md5s | md5s  # LCS and validation come from the seed-level split whatever the run's split
    return params, seed_level, parts, next(iter(md5s)), data, run_hash(params, name, seed, data)


def run_pair(params: Params, pair: Pair, parent_run_id: str, recorded_hash: str | None, threads: int
             ) -> dict[str, Any] | None:
    """Train one (run, draw, seed) for experiment.steps with `threads` torch threads and evaluate it (held-out
    sets and the validation set) under the parent MLflow run; None, at once, when its hash is `recorded_hash`.

    It runs in the flow's process (runner local) or in a Ray worker (runner ray), so it writes no result file:
    the flow's process does. The hash is computed here, on the machine that runs the pair: it includes what
    `auto` precision resolves to there."""
    name, draw, seed = pair
    values = hparams(params, params.experiment.runs[name].method, draw)
    params, seed_level, parts, source, data, key = _inputs(params, pair)
    if key == recorded_hash:
        return None
    start = time.time()
    run, tp, ex = params.experiment.runs[name], run_train_params(params, seed), params.experiment
    torch.set_num_threads(threads)
    device = resolve_device(tp.device)
    domains = run_domains(run, params.domains.train)
    held = validation_seeds(seed_level["train"], ex.val_seeds, params.domains.train, params.split.seed, str(TRAIN))
    _, val_rows = hold_out(seed_level["train"], held, params.domains.train)
    train_rows, _ = hold_out(parts["train"], held, params.domains.train)  # no run trains on a validation seed
    units = train_units(complete_groups(train_rows, params.domains.train), run, params.domains.train, seed, source)
    model, tokenizer = load_student(BASE_MODEL, params.lora, params.student.dtype, seed=seed)
    model.to(device)
    encoded, too_long = encode_groups(tokenizer, units, tp.max_length)
    if not encoded:
        raise DataError(f"{source}: run {name} has no training unit within train.max_length = {tp.max_length}")
    per_batch = tp.groups_per_batch * len(params.domains.train) // len(encoded[0])  # same sequences for every run
    micro_batches = batcher(encoded, tp, per_batch, tokenizer.pad_token_id)
    method = _build(params, run.method, model, tokenizer, domains)
    n_trainable = sum(p.numel() for p in trainable(model).values())
    checkpoints = experiment_checkpoints(*pair)
    mlflow = tracking.mlflow_module()
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=f"{name}/draw{draw}/seed{seed}", parent_run_id=parent_run_id) as child:
        mlflow.log_params({"run": name, "draw": draw, "seed": seed, **{f"hparam.{k}": v for k, v in values.items()},
                           **tracking.flat_params("run", run),
                           **tracking.flat_params("method", params.methods[run.method]),
                           **tracking.flat_params("train", tp)})
        mlflow.set_tags({"git_commit": tracking.git_commit(), "params_hash": key, "host": socket.gethostname(),
                         **{f"data_md5.{path}": md5 for path, md5 in data.items()}})
        history = train(model, method, micro_batches, tp, checkpoints, key, device,
                        on_step=lambda r: mlflow.log_metrics({k: v for k, v in r.items() if k != "step"},
                                                             step=int(r["step"])))
        train_s = time.perf_counter() - t0
        test, ood, to_generate, lcs_rows = evaluation_sets(seed_level, parts, run.split, ex.eval_groups, params.domains,
                                                        source)
        model = for_evaluation(model, params.eval.dtype, device)
        evaluation = evaluate_student(model, tokenizer, test, ood, {}, params.domains.train, to_generate=to_generate,
                                      max_new_tokens=ex.max_new_tokens, batch_size=params.eval.batch_size,
                                      nll_batch_size=params.eval.nll_batch_size,
                                      lcs_groups=len(lcs_rows), source=source, lcs_rows=lcs_rows)
        # validation: greedy accuracy as the test sets are scored, and the gold CoTs' NLL (the tie-break)
        completions = generate(model, tokenizer, [r["problem"] for r in val_rows], ex.max_new_tokens,
                               params.eval.batch_size)
        val = validation(score(val_rows, completions), teacher_forced(model, tokenizer, val_rows,
                                                                      params.eval.nll_batch_size)[0])
        metrics = summarize([evaluation], evaluation["lcs_layers"])
        summary = summarize_training(name, history, {"units_train": len(encoded), "units_too_long": too_long,
                                                     "trainable_parameters": n_trainable, "train_s": train_s,
                                                     "eval_s": time.perf_counter() - t0 - train_s})
        mlflow.log_metrics({k: metrics[k] for k in ("id_accuracy", "ood_accuracy", "delta_gap", "nll_id", "nll_ood",
                                                    "nll_gap")}
                           | {"train_s": train_s, "eval_s": summary["eval_s"], "val_accuracy": val["accuracy"],
                              "val_nll": val["nll"], "lcs_normalized": metrics["lcs"]["penultimate"]["normalized"]})
        result = {"run": name, "draw": draw, "hparams": values, "seed": seed, "params_hash": key,
                  "mlflow_run_id": child.info.run_id, "validation": val, "eval": metrics,
                  "evaluation": {"scores": evaluation["scores"], "lcs": evaluation["lcs"]},
                  "lcs_layers": evaluation["lcs_layers"], "train": summary, "history": history}
    shutil.rmtree(checkpoints)  # finished: nothing left to resume (the checkpoints live on the node that ran it)
    return result | {"ran": {"start": start, "end": time.time(), "host": socket.gethostname(),
                                "threads": torch.get_num_threads()}}


def _finish(log: Any, pair: Pair, recorded: dict[str, Any] | None, result: dict[str, Any] | None) -> dict[str, Any]:
    """The pair's result: the recorded one when it was skipped, else the new one, written and logged."""
    name, draw, seed = pair
    if result is None:
        log.info("%s draw %d seed %d: done (params hash %s), skipped", name, draw, seed, recorded["params_hash"])
        return recorded
    write_json(experiment_result(*pair), result)
    m, t = result["eval"], result["train"]
    log.info("%s draw %d seed %d on %s (%d threads): validation %.3f, ID %.3f, OOD %.3f, NLL OOD %.3f, LCS %.4f "
             "(train %.0f s, eval %.0f s)", name, draw, seed, result["ran"]["host"], result["ran"]["threads"],
             result["validation"]["accuracy"], m["id_accuracy"], m["ood_accuracy"], m["nll_ood"],
             m["lcs"]["penultimate"]["normalized"], t["train_s"], t["eval_s"])
    return result


@task(cache_policy=NO_CACHE)
def run_one(params: Params, name: str, draw: int, seed: int, parent_run_id: str) -> dict[str, Any]:
    """Runner local: one (run, draw, seed) in this process with train.threads; skipped when already done."""
    pair = (name, draw, seed)
    recorded = _recorded(pair)
    result = run_pair(params, pair, parent_run_id, recorded and recorded.get("params_hash"), params.train.threads)
    return _finish(get_run_logger(), pair, recorded, result)


def _on_ray_worker(params: Params, pair: Pair, parent_run_id: str, recorded_hash: str | None, workdir: str
                   ) -> dict[str, Any] | None:
    """One pair in a Ray worker: from the project checkout (the flow's directory, at the same path on every
    node: data/, models/ and a relative sqlite MLflow URI resolve there) with torch threads = the task's CPUs."""
    os.chdir(workdir)
    return run_pair(params, pair, parent_run_id, recorded_hash, params.experiment.ray.resources.num_cpus)


@task(cache_policy=NO_CACHE)
def run_on_ray(params: Params, pairs: list[Pair], parent_run_id: str) -> list[dict[str, Any]]:
    """Runner ray: every pair not done (its recorded hash is not this machine's) a Ray task reserving
    experiment.ray.resources, as many at once as the cluster fits. A worker checks the hash again on its
    own machine (auto precision may resolve otherwise there) and skips a pair done there. Results come back
    here and are written as each arrives: a killed matrix resumes from them, and a cluster needs no shared
    experiments/ directory. A failed pair fails the task after the others finish.

    Ray directly, not prefect-ray's RayTaskRunner. Measured on this 2-core machine against a running head
    (`ray start`), attaching and running 2 tiny tasks: Ray 0.9-3.2 s cold (worker start), 10 ms warm;
    RayTaskRunner 4.4-7.3 s cold, 0.4 s warm, as each worker runs Prefect's task engine and reports to the
    Prefect API (which then must be reachable from every node: a local run's ephemeral server is not). Both
    are small beside a run (minutes); what decides is that a task runner is fixed when the flow is defined,
    while experiment.runner is read when it runs, and that workers here need nothing but Ray and MLflow."""
    log = get_run_logger()
    recorded = {pair: _recorded(pair) for pair in pairs}
    results = {pair: _finish(log, pair, rec, None) for pair, rec in recorded.items()
               if rec and rec.get("params_hash") == _inputs(params, pair)[-1]}
    todo = [pair for pair in pairs if pair not in results]
    if todo:
        results |= _on_ray(params, todo, recorded, parent_run_id, log)
    return [results[pair] for pair in pairs]


def _on_ray(params: Params, pairs: list[Pair], recorded: dict[Pair, dict[str, Any] | None], parent_run_id: str,
            log: Any) -> dict[Pair, dict[str, Any]]:
    """`pairs` as Ray tasks on experiment.ray.address; their results as they arrive, written."""
    import ray

    ray_params = params.experiment.ray
    # Workers inherit the environment of the node's `ray start`, not this process's: the job passes MLflow's.
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "MLFLOW_EXPERIMENT_NAME": os.environ.get("MLFLOW_EXPERIMENT_NAME", tracking.DEFAULT_EXPERIMENT)}
    local = ray_params.address is None
    ray.init(address="local" if local else ray_params.address, runtime_env={"env_vars": env},
             **({"include_dashboard": False} if local else {}))
    try:
        log.info("Ray: %d pairs on %s (%s CPUs), %d CPUs and %g GPUs each", len(pairs), ray_params.address or "a "
                 "local instance", ray.cluster_resources().get("CPU", 0), ray_params.resources.num_cpus,
                 ray_params.resources.num_gpus)
        if sum(node["Alive"] for node in ray.nodes()) > 1 and not env["MLFLOW_TRACKING_URI"].startswith("http"):
            log.warning("MLFLOW_TRACKING_URI is %s: the runs on other nodes log to their own copy of it, not under "
                        "the parent run; use an MLflow server on a multi-node cluster (docs/experiment.md)",
                        env["MLFLOW_TRACKING_URI"])
        task_ = ray.remote(_on_ray_worker).options(num_cpus=ray_params.resources.num_cpus,
                                                   num_gpus=ray_params.resources.num_gpus)
        workdir = str(Path.cwd().resolve())
        refs = {task_.remote(params, pair, parent_run_id, (recorded[pair] or {}).get("params_hash"), workdir): pair
                for pair in pairs}
        results, failed, pending = {}, [], list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            pair = refs[done[0]]
            try:
                results[pair] = _finish(log, pair, recorded[pair], ray.get(done[0]))
            except ray.exceptions.RayError as e:
                failed.append((pair, e))
                log.error("%s draw %d seed %d failed on Ray: %s", *pair, e)
    finally:
        ray.shutdown()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pairs)} runs failed on Ray: "
                           f"{', '.join(f'{n} draw {d} seed {s}' for (n, d, s), _ in failed)}") from failed[0][1]
    return results


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
    figure with its interval over training seeds and test seeds. Table 1: each run's selected draw per
    training seed (iga.experiment.sweep.select); Table 2: every run at draw 0, IGA's included."""
    ex = params.experiment
    chosen = select(r for r in results if r["run"] in ex.table1)
    by_seed = lambda rows: sorted(rows, key=lambda r: r["seed"])  # noqa: E731
    tables = {1: {name: [chosen[(name, seed)] for seed in ex.seeds] for name in ex.table1},
              2: {name: by_seed(r for r in results if r["run"] == name and r["draw"] == 0)
                  for name in ("iga", *ex.table2)}}
    evaluations = {n: {name: [r["evaluation"] for r in rows] for name, rows in t.items()} for n, t in tables.items()}
    summaries = {n: {name: summarize(evaluations[n][name], rows[0]["lcs_layers"]) for name, rows in t.items()}
                 for n, t in tables.items()}
    runs = [RunResult(r["run"], r["seed"], r["eval"], r["train"], r["history"]) for rows in tables[1].values()
            for r in rows]
    n_val = chosen[(ex.table1[0], ex.seeds[0])]["validation"]["n"]
    scale = (f"{ex.steps} steps x {params.train.groups_per_batch * len(params.domains.train)} sequences per run, "
             f"{len(ex.seeds)} training seeds ({', '.join(map(str, ex.seeds))}); NLL and LCS on every test seed "
             f"({summaries[1]['iga']['nll_n_seeds']}), accuracy on the first {ex.eval_groups} "
             f"({ex.eval_groups * len(params.domains.train)} ID / {ex.eval_groups * len(params.domains.ood)} OOD "
             f"problems), max_new_tokens {ex.max_new_tokens}, student {params.student.base}")
    selection = (f"model selection: {SELECTION}, {ex.hparam_draws} draws per method (draw 0: the configured "
                 f"hyperparameters); for each training seed the draw with the best accuracy on {n_val} problems of "
                 f"{ex.val_seeds} held-out training seeds")
    written = write_report(EXPERIMENT_REPORT, runs, summaries=summaries[1], evaluations=evaluations[1],
                           title="Experiment: Table 1's runs", notes=[scale, selection])
    run_s = sum(r["train"]["train_s"] + r["train"]["eval_s"] for r in results)  # training + evaluation, all runs
    texts = {1: table1(summaries[1], evaluations[1], "iga", f"{scale}; {selection}", run_s)
             + "\n" + selection_table(tables[1], ex.hparam_draws, SELECTION),
             2: table2(summaries[2], evaluations[2], ex.runs, "iga", f"{scale}; every run at the configured "
                       "hyperparameters (draw 0), IGA's included: an ablation changes one thing"),
             3: table3(cost)}
    for n, text in texts.items():
        atomic_write_text(TABLES[n], text)
    mlflow = tracking.mlflow_module()
    for path in [*TABLES.values(), *written]:
        mlflow.MlflowClient().log_artifact(parent_run_id, str(path), "report")
    return [*TABLES.values(), *written]
