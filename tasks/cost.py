"""Table 3's measurements: each of Table 1's methods on the same batches, its step time and peak memory
(iga.experiment.cost), written to experiments/cost.json. Its own DVC stage: a pair's change does not rerun it."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import statistics
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.teacher import make_teacher
from iga.data.verify import make_verifier
from iga.experiment.cost import step_memory, step_time
from iga.experiment.variants import complete_groups, train_units
from iga.hardware import describe, resolve_device
from iga.io import read_jsonl, write_json
from iga.params import Params
from iga.train.methods import build_method
from iga.train.sft import collate, encode_groups
from iga.train.student import load_student
from tasks.paths import BASE_MODEL, COST, SEEDS, TRAIN

# Untimed steps before the rounds: at 986f5fe, after one warm-up step, every method's next step still took
# 1.3-3x its later ones (ERM 15.9 s, then 5.4 s and 5.4 s).
WARMUP_STEPS = 2

_worker: dict[str, Any] = {}  # a worker process's method, batches and device: one method per process


def _load(params: Params, method_name: str) -> None:
    """A worker's start: the student, the method and the batches every method steps on, each step on the next
    isomer batch as in training (a method's per-row work, VCD's student lines for rows it has not seen, is part of
    every step): the warm-ups, one batch per round, one for the memory step."""
    ex, tp = params.experiment, params.train
    torch.set_num_threads(tp.threads)
    device = resolve_device(tp.device)
    model, tokenizer = load_student(BASE_MODEL, params.lora, params.student.dtype, seed=tp.seed)
    model.to(device)
    rows = complete_groups(read_jsonl(TRAIN), params.domains.train)
    units = train_units(rows, params.experiment.runs["erm"], params.domains.train, tp.seed, str(TRAIN))
    encoded, _ = encode_groups(tokenizer, units, tp.max_length)
    g = tp.groups_per_batch
    batches = [collate(encoded[i * g:(i + 1) * g], tokenizer.pad_token_id, seed=0).to(device)
               for i in range(WARMUP_STEPS + ex.cost_steps + 1)]
    verifier = None
    if params.methods[method_name].kind == "vcd":  # it verifies each line against the seed's program (or the teacher)
        verifier = make_verifier(params, read_jsonl(SEEDS), make_teacher(params))
    _worker.update(method=build_method(params.methods[method_name], model, params.domains.train, tokenizer, verifier),
                   batches=batches, device=device)


def _step(i: int) -> tuple[float, int, int]:
    """(seconds, tokens, sequences) of the worker's step on batch i."""
    batch = _worker["batches"][i]
    return (step_time(_worker["method"], batch, _worker["device"]), int(batch.attention_mask.sum()),
            batch.input_ids.shape[0])


def _memory() -> tuple[float, float]:
    return step_memory(_worker["method"], _worker["batches"][-1], _worker["device"])


@task(cache_policy=NO_CACHE)
def measure_cost(params: Params) -> dict[str, Any]:
    """Each of Table 1's methods in its own process (so its peak memory is its own), with the model and batches
    identical, timed in interleaved rounds: in round r every method steps once on batch r, the methods' order
    rotated by one each round, so a method's ratio to ERM within a round is paired by batch and by the minute, and
    the machine's drift over the stage (2-3x between sittings at 986f5fe, when the methods ran one after the
    other) falls on every method alike. All the processes stay loaded (on a 2-core CPU, ~1 GB each for SmolLM2)
    and only one steps at a time. They fork from a server that has imported torch and transformers once (~10 s a
    process otherwise) and has run nothing: no threads, no model."""
    methods = list(dict.fromkeys(params.experiment.runs[r].method for r in params.experiment.table1))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    workers = {m: concurrent.futures.ProcessPoolExecutor(1, mp_context=context) for m in methods}
    try:
        for m in methods:  # a task, not the pool's initializer: a failure is raised here as itself
            workers[m].submit(_load, params, m).result()
        for i in range(WARMUP_STEPS):
            for m in methods:
                workers[m].submit(_step, i).result()
        rounds: dict[str, list[tuple[float, int, int]]] = {m: [] for m in methods}
        for r in range(params.experiment.cost_steps):
            for m in methods[r % len(methods):] + methods[:r % len(methods)]:
                rounds[m].append(workers[m].submit(_step, WARMUP_STEPS + r).result())
        memory = {m: workers[m].submit(_memory).result() for m in methods}
    finally:
        for pool in workers.values():
            pool.shutdown(cancel_futures=True)
    device = resolve_device(params.train.device)
    costs = {}
    for m in methods:
        times = [t for t, _, _ in rounds[m]]
        costs[m] = {"method": m, "step_time_s": statistics.median(times), "step_times_s": times,
                    "peak_mb": memory[m][1], "peak_total_mb": memory[m][0], "device": device.type,
                    "sequences": rounds[m][0][2], "tokens": [n for _, n, _ in rounds[m]]}
        get_run_logger().info("%s: %.2f s per step (median of %d rounds), peak +%.0f MB", m, costs[m]["step_time_s"],
                              len(times), costs[m]["peak_mb"])
    result = {"methods": costs, "runs": {r: params.experiment.runs[r].method for r in params.experiment.table1},
              "machine": describe(device), "warmup_steps": WARMUP_STEPS, "threads": params.train.threads}
    write_json(COST, result)
    return result
