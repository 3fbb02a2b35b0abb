"""One (run, hyperparameter draw, training seed) of the experiment as its DVC stage runs it: iga.experiment.pair's
training and evaluation with this project's files, checkpoints and an MLflow run, written as the small outputs
the stage declares (tasks.paths.pair_outputs).

What this module imports is the code of every pair stage (dvc.yaml `run`, `sweep`): a change here reruns the
whole matrix. The matrix around it (DVC, Ray) is tasks/matrix.py, the tables tasks/tables.py.
"""
from __future__ import annotations

import shutil
import socket
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.teacher import make_teacher
from iga.data.verify import make_verifier
from iga.experiment.pair import PairData, pair_train_params, run_pair as run_pair_
from iga.experiment.sweep import Pair, drawn, hparams, ranges_read
from iga.hardware import resolve_device, resolve_precision
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from iga.stages import fingerprint
from iga.train.loop import resume_point
from tasks import tracking
from tasks.paths import BASE_MODEL, SEEDS, pair_checkpoints, pair_inputs, pair_outputs


def _data(select: str) -> tuple[PairData, dict[str, str]]:
    """The rows a pair whose run selects by `select` reads and the md5 of each file, as dvc.lock records them."""
    files = pair_inputs(select)
    return PairData.read(files), {str(p): tracking.data_hash(p) for p in files.values()}


def _verifier(params: Params, method: str) -> Any:
    """VCD verifies lines against the seeds' programs (or the teacher); no other method verifies."""
    if params.methods[method].kind != "vcd":
        return None
    return make_verifier(params, read_jsonl(SEEDS), make_teacher(params))


def run_pair(params: Params, pair: Pair, parent_run_id: str, threads: int) -> dict[str, Any]:
    """`pair` trained and evaluated (iga.experiment.pair.run_pair) with `threads` torch threads, logged as a child
    MLflow run of the experiment's parent. Returns its outputs ({metrics, scores, lcs}) unwritten: it runs in a pair
    stage's process or in a Ray worker, whose results come back to the driver to be written.

    A killed pair resumes from its checkpoint (and its MLflow run) when nothing it depends on changed: the
    checkpoint's fingerprint is its DVC stage's code and params, the data's md5s and the precision `auto`
    resolved to here."""
    name, draw, seed = pair
    run = params.experiment.runs[name]
    torch.set_num_threads(threads)
    device = resolve_device(params.train.device)
    data, md5s = _data(run.select)
    tp = pair_train_params(drawn(params, name, draw), seed)
    precision = resolve_precision(tp.precision, device)
    item = {"run": name, "method": run.method, "ranges": ranges_read(params, name)}  # its DVC stage's item
    key = fingerprint(pair.group, params, item, draw=draw, seed=seed, data=md5s, precision=precision)
    checkpoints = pair_checkpoints(pair.key)
    resumed_at, extra = resume_point(checkpoints, key)
    mlflow = tracking.mlflow_module()
    run_id = extra.get("mlflow_run_id")  # a resumed pair keeps logging into its MLflow run, where this store has it
    if run_id and not mlflow.search_runs(filter_string=f"attributes.run_id = '{run_id}'", output_format="list"):
        run_id = None
    with (mlflow.start_run(run_id=run_id) if run_id else
          mlflow.start_run(run_name=pair.name, parent_run_id=parent_run_id)) as child:
        if run_id is None:
            mlflow.log_params({"run": name, "draw": draw, "seed": seed,
                               **{f"hparam.{k}": v for k, v in hparams(params, run.method, draw).items()},
                               **tracking.flat_params("run", run),
                               **tracking.flat_params("method", drawn(params, name, draw).methods[run.method]),
                               **tracking.flat_params("train", tp)})
            mlflow.set_tags({"git_commit": tracking.git_commit(), "dvc_stage": pair.stage, "host": socket.gethostname(),
                             **{f"data_md5.{path}": md5 for path, md5 in md5s.items()}})
        result = run_pair_(params, pair, data, BASE_MODEL, device, checkpoints=checkpoints, key=key,
                           resumed_at=resumed_at, verifier=_verifier(params, run.method),
                           on_step=lambda r: mlflow.log_metrics({k: v for k, v in r.items() if k != "step"},
                                                                step=int(r["step"])),
                           extra_state={"mlflow_run_id": child.info.run_id})
        metrics = result["metrics"]
        mlflow.log_metrics({k: metrics["eval"][k] for k in ("id_accuracy", "ood_accuracy", "delta_gap", "nll_id",
                                                            "nll_ood", "nll_gap")}
                           | {"train_s": metrics["train"]["train_s"], "eval_s": metrics["train"]["eval_s"],
                              "val_accuracy": metrics["validation"]["accuracy"], "val_nll": metrics["validation"]["nll"],
                              "val_ood_accuracy": metrics["validation"]["ood"]["accuracy"],
                              "lcs_normalized": metrics["eval"]["lcs"]["penultimate"]["normalized"]})
    shutil.rmtree(checkpoints)  # finished: nothing left to resume (the checkpoints live on the node that ran it)
    metrics.update(mlflow_run_id=child.info.run_id, data_md5=md5s)
    return result


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
