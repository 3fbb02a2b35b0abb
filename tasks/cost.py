"""Table 3's measurements: each of Table 1's methods on the same batch, its step time and peak memory
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
from iga.hardware import resolve_device
from iga.io import read_jsonl, write_json
from iga.params import Params
from iga.train.methods import build_method
from iga.train.sft import collate, encode_groups
from iga.train.student import load_student
from tasks.paths import BASE_MODEL, COST, SEEDS, TRAIN


def _cost_of(params: Params, method_name: str) -> dict[str, Any]:
    """In a fresh process: a method's step time (iga.experiment.cost), the median of experiment.cost_steps after a
    warm-up step, and its peak memory during one more step, each step on the next isomer batch as in training: a
    method's per-row work (VCD's student lines, generated for rows it has not seen) is part of every step."""
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
               for i in range(ex.cost_steps + 2)]  # a warm-up, the timed steps, the memory step
    verifier = None
    if params.methods[method_name].kind == "vcd":  # it verifies each line against the seed's program (or the teacher)
        verifier = make_verifier(params, read_jsonl(SEEDS), make_teacher(params))
    method = build_method(params.methods[method_name], model, params.domains.train, tokenizer, verifier)
    times = [step_time(method, batch, device) for batch in batches[:-1]][1:]
    peak, extra = step_memory(method, batches[-1], device)
    return {"method": method_name, "step_time_s": statistics.median(times), "step_times_s": times,
            "peak_mb": extra, "peak_total_mb": peak, "device": device.type, "sequences": batches[0].input_ids.shape[0],
            "tokens": [int(batch.attention_mask.sum()) for batch in batches[1:-1]]}


@task(cache_policy=NO_CACHE)
def measure_cost(params: Params) -> dict[str, Any]:
    """Each of Table 1's methods on the same batch, one after the other, each in its own process (so its peak
    memory is its own), with the model, data and batch identical. The processes fork from a server that has
    imported torch and transformers once (~10 s a process otherwise) and has run nothing: no threads, no model."""
    methods = list(dict.fromkeys(params.experiment.runs[r].method for r in params.experiment.table1))
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    costs = {}
    for m in methods:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            costs[m] = pool.submit(_cost_of, params, m).result()
        get_run_logger().info("%s: %.2f s per step, peak +%.0f MB", m, costs[m]["step_time_s"], costs[m]["peak_mb"])
    result = {"methods": costs, "runs": {r: params.experiment.runs[r].method for r in params.experiment.table1}}
    write_json(COST, result)
    return result
