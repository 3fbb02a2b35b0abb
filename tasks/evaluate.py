"""Evaluate one trained method: accuracy, NLL and LCS with their 95 % intervals, and every problem's score."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.eval.evaluate import score_adapter
from iga.eval.scores import summarize
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from iga.stages import params_hash
from tasks.paths import BASE_MODEL, OOD, TEST, TRAIN, adapter_dir, completions_file, eval_metrics, eval_plot, scores_file


@task(cache_policy=NO_CACHE)
def evaluate_method(params: Params, method: str) -> dict[str, Any]:
    params.method(method)  # an unknown name fails here, before any model is loaded
    evaluation = score_adapter(params, BASE_MODEL, adapter_dir(method), read_jsonl(TEST), read_jsonl(OOD),
                               read_jsonl(TRAIN), str(TEST), method)
    metrics = {"method": method, "params_hash": params_hash("evaluate", params, method), "device": evaluation["device"],
               "dtype": evaluation["dtype"], "decoding": evaluation["decoding"], "cost": evaluation["cost"],
               **summarize([evaluation], evaluation["lcs_layers"])}
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
