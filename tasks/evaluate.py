"""Evaluate one trained method: accuracy, NLL and LCS with their 95 % intervals, and every problem's score."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from iga.errors import DataError
from iga.evaluate import evaluate_student
from iga.external import load_benchmark
from iga.hardware import describe, resolve_device, resolve_precision
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from iga.scores import summarize
from iga.student import load_trained
from tasks import tracking
from tasks.paths import BASE_MODEL, OOD, TEST, adapter_dir, completions_file, eval_metrics, eval_plot, scores_file

# Settings that do not change what an evaluation computes.
_NOT_IN_PARAMS_HASH = {"train": ("methods", "threads", "checkpoint_every", "device"), "eval": ("threads",)}


def params_hash(params: Params, method: str) -> str:
    """The params a method's evaluation depends on directly: its training and the evaluation settings
    (the data's own params act through the data files, which DVC tracks). A metrics file whose hash
    differs was computed under another params.yaml."""
    spec = {k: dataclasses.asdict(getattr(params, k)) for k in ("domains", "student", "lora", "train", "eval")}
    for section, keys in _NOT_IN_PARAMS_HASH.items():
        for key in keys:
            del spec[section][key]
    spec["method"] = dataclasses.asdict(params.methods[method])
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_eval_metrics(params: Params, method: str) -> dict[str, Any]:
    """metrics/eval/<method>.json, refused when it was computed under other params."""
    path = eval_metrics(method)
    if not path.is_file():
        raise DataError(f"{path}: no evaluation of {method}; run `dvc repro evaluate@{method}`")
    metrics, expected = json.loads(path.read_text()), params_hash(params, method)
    if metrics.get("params_hash") != expected:
        raise DataError(f"{path}: computed under another params.yaml (params_hash {metrics.get('params_hash')}, "
                        f"now {expected}); run `dvc repro` to re-evaluate")
    return metrics


def eval_key(params: Params) -> str:
    """What makes two versions' scores comparable problem by problem: the same held-out rows and the
    same evaluation settings on the same base model."""
    eval_ = {k: v for k, v in dataclasses.asdict(params.eval).items() if k not in ("threads", "lcs_groups")}
    eval_["dtype"] = resolve_precision(params.eval.dtype, resolve_device(params.train.device))  # auto: per machine
    spec = {"test": tracking.data_hash(TEST), "ood": tracking.data_hash(OOD), "student": dataclasses.asdict(params.student),
            "eval": eval_}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def score_adapter(params: Params, adapter: Path, name: str) -> dict[str, Any]:
    """Evaluate the base model with `adapter` merged in on the held-out sets (iga.evaluate.evaluate_student)."""
    ev = params.eval
    torch.set_num_threads(ev.threads)
    model, tokenizer = load_trained(BASE_MODEL, adapter, params.student.dtype)
    # merged: the same function, no LoRA branch to run at every decoding step
    device = resolve_device(params.train.device)
    model = model.merge_and_unload().to(device, getattr(torch, resolve_precision(ev.dtype, device)))
    with ExitStack() as bars:  # a progress bar per phase, each closed at the end
        evaluation = evaluate_student(
            model, tokenizer, read_jsonl(TEST), read_jsonl(OOD),
            {b: load_benchmark(b, e.limit) for b, e in ev.external.items() if e.limit}, params.domains.train,
            to_generate=None, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
            nll_batch_size=ev.nll_batch_size, lcs_groups=ev.lcs_groups, source=str(TEST),
            progress=lambda what, total: bars.enter_context(tqdm(total=total, desc=f"{name}: {what}")).update)
    return evaluation | {"device": describe(device), "dtype": resolve_precision(ev.dtype, device)}


@task(cache_policy=NO_CACHE)
def evaluate_method(params: Params, method: str) -> dict[str, Any]:
    params.method(method)  # an unknown name fails here, before any model is loaded
    evaluation = score_adapter(params, adapter_dir(method), method)
    metrics = {"method": method, "params_hash": params_hash(params, method), "device": evaluation["device"],
               "dtype": evaluation["dtype"], **summarize([evaluation], evaluation["lcs_layers"])}
    write_jsonl(completions_file(method), evaluation["completions"])
    write_jsonl(scores_file(method), evaluation["scores"])
    write_json(eval_plot(method, "accuracy"), [{"split": s, "accuracy": metrics[f"{s}_accuracy"]}
                                              for s in ("id", "ood")]
               + [{"split": n, "accuracy": e["accuracy"]} for n, e in metrics["external"].items()])
    write_json(eval_plot(method, "lcs"), [{"depth": d, "layer": v["layer"], "lcs_normalized": v["normalized"],
                                           "lcs_raw": v["raw"]} for d, v in metrics["lcs"].items()])
    write_json(eval_metrics(method), metrics)
    ci = metrics["ci"]
    get_run_logger().info(
        "%s: ID accuracy %.3f %s, OOD %.3f %s, Δ-Gap %.3f %s, NLL gap %.3f %s (95 %% CIs over %d test seeds)",
        method, metrics["id_accuracy"], ci["id_accuracy"], metrics["ood_accuracy"], ci["ood_accuracy"],
        metrics["delta_gap"], ci["delta_gap"], metrics["nll_gap"], ci["nll_gap"], metrics["n_seeds"])
    return metrics
