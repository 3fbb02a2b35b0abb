"""One (run, hyperparameter draw, training seed) of the experiment: trained, evaluated on the held-out sets and
the validation set, and written as the small outputs its DVC stage declares (tasks.paths.pair_outputs).

What this module imports is the code of every pair stage (dvc.yaml `run`, `sweep`): a change here reruns the
whole matrix. The matrix around it (DVC, Ray) is tasks/matrix.py, the tables tasks/tables.py.
"""
from __future__ import annotations

import dataclasses
import shutil
import socket
import time
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.split import split
from iga.data.teacher import make_teacher
from iga.data.verify import make_verifier
from iga.errors import DataError
from iga.eval.evaluate import decoding, evaluate_student, for_evaluation, generate, score, teacher_forced
from iga.eval.scores import summarize
from iga.experiment.sweep import Pair, drawn, hold_out, hparams, ranges_read, validation, validation_seeds
from iga.experiment.variants import as_seen, complete_groups, evaluation_sets, run_domains, train_units
from iga.hardware import describe, resolve_device, resolve_precision
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params, TrainParams
from iga.stages import fingerprint
from iga.train.loop import resume_point, summarize as summarize_training, train, trainable
from iga.train.methods import build_method
from iga.train.sft import batcher, encode_groups
from iga.train.student import load_student
from tasks import tracking
from tasks.paths import ACCEPTED, BASE_MODEL, OOD, SEEDS, TEST, TRAIN, pair_checkpoints, pair_outputs

Rows = dict[str, list[dict[str, Any]]]  # a split's train/test/ood rows


def pair_train_params(params: Params, seed: int) -> TrainParams:
    return dataclasses.replace(params.train, seed=seed, steps=params.experiment.steps)


def _parts(params: Params, unit: str) -> tuple[Rows, dict[str, str]]:
    """The train/test/OOD rows of a `unit`-level split and the md5 of each file they come from: the
    split stage's outputs when it split by `unit` (the default, seed), else accepted.jsonl split here
    (the instance-level leakage ablation)."""
    if unit == params.split.unit:
        files = {"train": TRAIN, "test": TEST, "ood": OOD}
        return {side: read_jsonl(path) for side, path in files.items()}, {str(p): tracking.data_hash(p)
                                                                           for p in files.values()}
    parts, _ = split(read_jsonl(ACCEPTED), dataclasses.replace(params.split, unit=unit), params.domains)
    return parts, {str(ACCEPTED): tracking.data_hash(ACCEPTED)}


def _method(params: Params, name: str, model: Any, tokenizer: Any, domains: tuple[str, ...]) -> Any:
    """The method `name`; VCD also verifies lines against the seeds' programs (or the teacher)."""
    verifier = None
    if params.methods[name].kind == "vcd":
        verifier = make_verifier(params, read_jsonl(SEEDS), make_teacher(params))
    return build_method(params.methods[name], model, domains, tokenizer, verifier)


def run_pair(params: Params, pair: Pair, parent_run_id: str, threads: int) -> dict[str, Any]:
    """Train `pair` for experiment.steps with `threads` torch threads and evaluate it (held-out sets and the
    validation set) under the parent MLflow run. Returns its outputs ({metrics, scores, lcs}) unwritten: it runs
    in a pair stage's process or in a Ray worker, whose results come back to the driver to be written.

    A killed pair resumes from its checkpoint (and its MLflow run) when nothing it depends on changed: the
    checkpoint's fingerprint is its DVC stage's code and params, the data's md5s and the precision `auto`
    resolved to here."""
    name, draw, seed = pair
    start = time.time()
    configured, run, ex = params, params.experiment.runs[name], params.experiment
    values = hparams(params, run.method, draw)
    params = drawn(params, name, draw)
    tp = pair_train_params(params, seed)
    torch.set_num_threads(threads)
    device = resolve_device(tp.device)
    seed_level, seed_md5s = _parts(params, "seed")
    parts, md5s = (seed_level, seed_md5s) if run.split == "seed" else _parts(params, run.split)
    seed_level, parts = ({side: as_seen(rows, run) for side, rows in sides.items()} for sides in (seed_level, parts))
    source = next(iter(md5s))  # the file its training rows come from
    data = seed_md5s | md5s  # LCS and validation come from the seed-level split whatever the run's split
    precision, eval_dtype = resolve_precision(tp.precision, device), resolve_precision(params.eval.dtype, device)
    item = {"run": name, "method": run.method, "ranges": ranges_read(configured, name)}  # its DVC stage's item
    key = fingerprint(pair.group, configured, item, draw=draw, seed=seed, data=data, precision=precision)
    checkpoints = pair_checkpoints(pair.key)
    resumed_at, extra = resume_point(checkpoints, key)

    held = validation_seeds(seed_level["train"], ex.val_seeds, params.domains.train, params.split.seed, str(TRAIN))
    _, val_rows = hold_out(seed_level["train"], held, params.domains.train)
    val_ood = as_seen(hold_out(read_jsonl(ACCEPTED), held, params.domains.ood)[1], run)  # test-domain validation
    train_rows, _ = hold_out(parts["train"], held, params.domains.train)  # no run trains on a validation seed
    units = train_units(complete_groups(train_rows, params.domains.train), run, params.domains.train, seed, source)
    model, tokenizer = load_student(BASE_MODEL, params.lora, params.student.dtype, seed=seed)
    model.to(device)
    encoded, too_long = encode_groups(tokenizer, units, tp.max_length)
    if not encoded:
        raise DataError(f"{source}: run {name} has no training unit within train.max_length = {tp.max_length}")
    per_batch = tp.groups_per_batch * len(params.domains.train) // len(encoded[0])  # same sequences for every run
    micro_batches = batcher(encoded, tp, per_batch, tokenizer.pad_token_id)
    method = _method(params, run.method, model, tokenizer, run_domains(run, params.domains.train))
    n_trainable = sum(p.numel() for p in trainable(model).values())
    mlflow = tracking.mlflow_module()
    run_id = extra.get("mlflow_run_id")  # a resumed pair keeps logging into its MLflow run, where this store has it
    if run_id and not mlflow.search_runs(filter_string=f"attributes.run_id = '{run_id}'", output_format="list"):
        run_id = None
    t0 = time.perf_counter()
    with (mlflow.start_run(run_id=run_id) if run_id else
          mlflow.start_run(run_name=pair.name, parent_run_id=parent_run_id)) as child:
        if run_id is None:
            mlflow.log_params({"run": name, "draw": draw, "seed": seed, **{f"hparam.{k}": v for k, v in values.items()},
                               **tracking.flat_params("run", run),
                               **tracking.flat_params("method", params.methods[run.method]),
                               **tracking.flat_params("train", tp)})
            mlflow.set_tags({"git_commit": tracking.git_commit(), "dvc_stage": pair.stage, "host": socket.gethostname(),
                             **{f"data_md5.{path}": md5 for path, md5 in data.items()}})
        history = train(model, method, micro_batches, tp, checkpoints, key, device,
                        on_step=lambda r: mlflow.log_metrics({k: v for k, v in r.items() if k != "step"},
                                                             step=int(r["step"])),
                        extra_state={"mlflow_run_id": child.info.run_id})
        train_s = time.perf_counter() - t0
        test, ood, to_generate, lcs_rows = evaluation_sets(seed_level, parts, run.split, ex.eval_groups, params.domains,
                                                           source)
        model = for_evaluation(model, params.eval.dtype, device)
        how = decoding(ex.max_new_tokens, tokenizer, seed_level["train"])
        evaluation = evaluate_student(model, tokenizer, test, ood, {}, params.domains.train, to_generate=to_generate,
                                      how=how, batch_size=params.eval.batch_size,
                                      nll_batch_size=params.eval.nll_batch_size,
                                      lcs_groups=len(lcs_rows), source=source, lcs_rows=lcs_rows)
        # validation in the training domains and in the held-out ones: greedy accuracy as the test sets are
        # scored, and the gold CoTs' NLL (the tie-break)
        both = val_rows + val_ood
        forced = teacher_forced(model, tokenizer, [(r["problem"], r["cot_solution"]) for r in both],
                                params.eval.nll_batch_size, prime=range(len(both)))
        completions = generate(model, tokenizer, [r["problem"] for r in both], how, params.eval.batch_size,
                               {i: f.primed for i, f in enumerate(forced)})
        figures = [validation(score(rows, [c.text for c in completions[part]]),
                              [(f.nll, f.tokens) for f in forced[part]])
                   for rows, part in ((val_rows, slice(len(val_rows))), (val_ood, slice(len(val_rows), None)))]
        val = figures[0] | {"ood": figures[1]}
        metrics = summarize([evaluation], evaluation["lcs_layers"])
        summary = summarize_training(name, history, {"units_train": len(encoded), "units_too_long": too_long,
                                                     "trainable_parameters": n_trainable, "train_s": train_s,
                                                     "eval_s": time.perf_counter() - t0 - train_s,
                                                     "resumed_at_step": resumed_at})
        mlflow.log_metrics({k: metrics[k] for k in ("id_accuracy", "ood_accuracy", "delta_gap", "nll_id", "nll_ood",
                                                    "nll_gap")}
                           | {"train_s": train_s, "eval_s": summary["eval_s"], "val_accuracy": val["accuracy"],
                              "val_nll": val["nll"], "val_ood_accuracy": val["ood"]["accuracy"],
                              "lcs_normalized": metrics["lcs"]["penultimate"]["normalized"]})
    shutil.rmtree(checkpoints)  # finished: nothing left to resume (the checkpoints live on the node that ran it)
    ran = {"device": describe(device), "train_precision": precision, "eval_dtype": eval_dtype,
           "decoding": dataclasses.asdict(how),
           "host": socket.gethostname(), "threads": torch.get_num_threads(), "start": start, "end": time.time()}
    return {"metrics": {"run": name, "draw": draw, "seed": seed, "hparams": values, "mlflow_run_id": child.info.run_id,
                        "validation": val, "eval": metrics, "lcs_layers": evaluation["lcs_layers"], "train": summary,
                        "history": history, "data_md5": data, "ran": ran},
            "scores": evaluation["scores"], "lcs": evaluation["lcs"]}


def write_pair(pair: Pair, result: dict[str, Any]) -> None:
    """The pair's outputs, each written atomically, metrics.json last: a pair whose metrics exist is whole."""
    paths = pair_outputs(*pair)
    write_jsonl(paths["scores"], result["scores"])
    write_jsonl(paths["lcs"], result["lcs"])
    write_json(paths["metrics"], result["metrics"])


def describe_result(pair: Pair, metrics: dict[str, Any]) -> str:
    m, t, ran = metrics["eval"], metrics["train"], metrics["ran"]
    return (f"{pair.stage} on {ran['host']} ({ran['threads']} threads, {ran['train_precision']} training, "
            f"{ran['eval_dtype']} evaluation): validation {metrics['validation']['accuracy']:.3f}, ID "
            f"{m['id_accuracy']:.3f}, OOD {m['ood_accuracy']:.3f}, NLL OOD {m['nll_ood']:.3f}, LCS "
            f"{m['lcs']['penultimate']['normalized']:.4f} (train {t['train_s']:.0f} s, eval {t['eval_s']:.0f} s)")


@task(cache_policy=NO_CACHE)
def run_one(params: Params, pair: Pair) -> None:
    """A pair stage: `pair` in this process with train.threads, its outputs written."""
    result = run_pair(params, pair, tracking.experiment_parent(), params.train.threads)
    write_pair(pair, result)
    get_run_logger().info(describe_result(pair, result["metrics"]))
