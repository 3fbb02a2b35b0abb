"""Train one method: data and student from disk, iga.train.loop in between, adapter, metrics and MLflow out.

Under torchrun every rank runs `train_method` on its share of each batch; rank 0 alone runs it as a
Prefect task (flows/train.py), logs to MLflow and writes the outputs."""
from __future__ import annotations

import logging
import shutil
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from iga.data.teacher import make_teacher
from iga.data.verify import make_verifier
from iga.errors import DataError
from iga.hardware import describe, resolve_device, resolve_precision
from iga.io import atomic_dir, read_jsonl, write_json, write_jsonl
from iga.params import Params
from iga.stages import fingerprint
from iga.train import distributed
from iga.train.loop import resume_point, summarize, train, trainable
from iga.train.methods import build_method
from iga.train.sft import batcher, encode_groups, isomer_groups
from iga.train.student import load_student, save_adapter
from tasks import tracking
from tasks.paths import BASE_MODEL, SEEDS, SELECTED, adapter_dir, checkpoint_dir, history_file, train_metrics


@task(cache_policy=NO_CACHE)
def train_method(params: Params, method: str) -> dict[str, Any]:
    params.method(method)  # an unknown name fails here, before any model is loaded
    tp = params.train
    device = resolve_device(tp.device)
    world = distributed.join(device, tp.collective_timeout_s)
    log = get_run_logger() if world.main else logging.getLogger(f"{__name__}.rank{world.rank}")
    torch.set_num_threads(max(1, tp.threads // world.local_size))  # the ranks on a machine share its cores
    model, tokenizer = load_student(BASE_MODEL, params.lora, params.student.dtype, seed=tp.seed)
    model.to(device)
    groups, too_long = encode_groups(tokenizer, isomer_groups(read_jsonl(SELECTED), params.domains.train, str(SELECTED)),
                                     tp.max_length)
    if not groups:
        raise DataError(f"{SELECTED}: no isomer group fits in train.max_length = {tp.max_length} tokens")
    micro_batches = batcher(groups, tp, tp.groups_per_batch, tokenizer.pad_token_id, world)
    verifier = None
    if params.methods[method].kind == "vcd":  # it verifies each line against the seed's program (or the teacher)
        verifier = make_verifier(params, read_jsonl(SEEDS), make_teacher(params))
    data_md5 = tracking.data_hash(SELECTED)
    key = fingerprint("train-run", params, method, data=data_md5)
    ckpt = checkpoint_dir(method)
    start, extra = resume_point(ckpt, key)
    run_id = extra.get("mlflow_run_id")  # a resumed run keeps logging into its MLflow run
    n_trainable = sum(p.numel() for p in trainable(model).values())
    log.info("%s: %d groups (%d longer than %d tokens dropped), %d steps on %s x %d rank(s), %d trainable parameters",
             method, len(groups), too_long, tp.max_length, tp.steps, device, world.size, n_trainable)
    if start:
        log.info("%s: resuming from %s at step %d (MLflow run %s)", method, ckpt, start, run_id)
    method_impl = build_method(params.methods[method], model, params.domains.train, tokenizer, verifier, world)
    if not world.main:
        return summarize(method, train(model, method_impl, micro_batches, tp, ckpt, key, device, world=world),
                         {"world_size": world.size})
    mlflow = tracking.mlflow_module()
    with mlflow.start_run(run_id=run_id, run_name=method) as run:
        if run_id is None:
            mlflow.log_params({"method": method, "world_size": world.size,
                               **tracking.flat_params("method", params.methods[method]),
                               **tracking.flat_params("student", params.student),
                               **tracking.flat_params("lora", params.lora), **tracking.flat_params("train", tp),
                               "domains.train": ",".join(params.domains.train)})
            mlflow.set_tags({"git_commit": tracking.git_commit(), "data_md5": data_md5, "method": method,
                             "method_kind": params.methods[method].kind})

        def on_step(record: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if record["step"] % 5 == 0 or record["step"] + 1 == tp.steps:
                log.info("%s step %d/%d: loss %.4f, %.1f s", method, record["step"] + 1, tp.steps, record["loss"],
                         record["step_time_s"])

        with tqdm(total=tp.steps, initial=start, desc=f"{method}: training", unit="step") as bar:
            history = train(model, method_impl, micro_batches, tp, ckpt, key, device, on_step=on_step,
                            extra_state={"mlflow_run_id": run.info.run_id}, world=world)
        with atomic_dir(adapter_dir(method)) as tmp:
            save_adapter(model, tokenizer, tmp)
        write_jsonl(history_file(method), history)
        summary = summarize(method, history, {"groups_train": len(groups), "groups_too_long": too_long,
                                              "trainable_parameters": n_trainable, "device": describe(device),
                                              "world_size": world.size,
                                              "precision": resolve_precision(tp.precision, device),
                                              "mlflow_run_id": run.info.run_id})
        write_json(train_metrics(method), summary)
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
        mlflow.log_artifacts(str(adapter_dir(method)), "adapter")
    shutil.rmtree(ckpt)  # the adapter is written: a later run of this stage starts afresh
    log.info("%s: mean loss %.4f in the first quarter of the run, %.4f in the last; adapter -> %s", method,
             summary["loss_first_quarter"], summary["loss_last_quarter"], adapter_dir(method))
    return summary
