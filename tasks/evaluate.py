"""Evaluate one trained method: accuracy (ID, OOD, per domain, external benchmarks) and LCS."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from iga.answers import extract_answer
from iga.errors import DataError
from iga.evaluate import accuracy_report, generate, lcs, score
from iga.external import extract_prediction, is_correct, load_benchmark
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from iga.student import load_trained
from tasks.paths import BASE_MODEL, OOD, TEST, adapter_dir, completions_file, eval_metrics, eval_plot
from tasks.train import resolve_device

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


@task(cache_policy=NO_CACHE)
def evaluate_method(params: Params, method: str) -> dict[str, Any]:
    log = get_run_logger()
    params.method(method)  # an unknown name fails here, before any model is loaded
    ev = params.eval
    torch.set_num_threads(ev.threads)
    model, tokenizer = load_trained(BASE_MODEL, adapter_dir(method), params.student.dtype)
    # merged: the same function, no LoRA branch to run at every decoding step
    model = model.merge_and_unload().to(resolve_device(params.train.device), getattr(torch, ev.dtype))
    test, ood = read_jsonl(TEST), read_jsonl(OOD)
    external = {name: load_benchmark(name, e.limit) for name, e in ev.external.items() if e.limit}
    sets = {"test": test, "ood": ood} | external
    problems = [r["problem"] for rows in sets.values() for r in rows]
    with tqdm(total=len(problems), desc=f"{method}: generating", unit="problem") as bar:
        flat = iter(generate(model, tokenizer, problems, ev.max_new_tokens, ev.batch_size, on_batch=bar.update))
    done = {name: [next(flat) for _ in rows] for name, rows in sets.items()}  # one call: fuller batches
    metrics = {"method": method, "params_hash": params_hash(params, method),
               **accuracy_report(test, score(test, done["test"]), ood, score(ood, done["ood"]))}
    with tqdm(total=min(ev.lcs_groups, len({r["group_id"] for r in test})), desc=f"{method}: LCS", unit="group") as bar:
        metrics |= lcs(model, tokenizer, test, params.domains.train, ev.lcs_groups, str(TEST), on_group=bar.update)
    metrics["external"] = {}
    records = [{"set": name, "id": f"{r['group_id']}/{r['domain']}", "gold": r["answer"],
                "predicted": extract_answer(c), "completion": c}
               for name in ("test", "ood") for r, c in zip(sets[name], done[name])]
    for name, rows in external.items():
        preds = [extract_prediction(name, c) for c in done[name]]
        hits = [is_correct(name, p, r["answer"]) for p, r in zip(preds, rows)]
        metrics["external"][name] = {"accuracy": statistics.fmean(hits), "n": len(rows)}
        records += [{"set": name, "id": r["id"], "gold": r["answer"], "predicted": p, "completion": c}
                    for r, p, c in zip(rows, preds, done[name])]
    write_jsonl(completions_file(method), records)
    write_json(eval_plot(method, "accuracy"), [{"split": s, "accuracy": metrics[f"{s}_accuracy"]}
                                              for s in ("id", "ood")]
               + [{"split": n, "accuracy": e["accuracy"]} for n, e in metrics["external"].items()])
    write_json(eval_plot(method, "lcs"), [{"depth": d, "layer": v["layer"], "lcs_normalized": v["normalized"],
                                           "lcs_raw": v["raw"]} for d, v in metrics["lcs"].items()])
    write_json(eval_metrics(method), metrics)
    log.info("%s: ID accuracy %.3f, OOD %.3f, Δ-Gap %.3f, LCS (normalised, penultimate) %.4f", method,
             metrics["id_accuracy"], metrics["ood_accuracy"], metrics["delta_gap"],
             metrics["lcs"]["penultimate"]["normalized"])
    return metrics
