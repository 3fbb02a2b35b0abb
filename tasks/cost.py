"""Table 3's measurements: each of Table 1's methods on the same batches, its step time and peak memory
(iga.experiment.cost), written to experiments/cost.json. Its own DVC stage: a pair's change does not rerun it."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import statistics
from typing import Any, Iterable

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.teacher import make_teacher
from iga.data.verify import make_verifier
from iga.errors import ConfigError
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
Step = tuple[float, int, int]  # a step's seconds, tokens and sequences


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


def _step(i: int) -> Step:
    """(seconds, tokens, sequences) of the worker's step on batch i."""
    batch = _worker["batches"][i]
    return (step_time(_worker["method"], batch, _worker["device"]), int(batch.attention_mask.sum()),
            batch.input_ids.shape[0])


def _memory() -> tuple[float, float]:
    return step_memory(_worker["method"], _worker["batches"][-1], _worker["device"])


class _Worker:
    """One method in its own process (so its peak memory is its own), forked from a server that has imported torch
    and transformers once (~10 s a process otherwise) and has run nothing: no threads, no model. A context: the
    process ends with the block."""

    def __init__(self, params: Params, method_name: str, context: Any):
        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
        try:
            self.pool.submit(_load, params, method_name).result()  # a task, not an initializer: a failure is itself
            for i in range(WARMUP_STEPS):
                self.step(i)
        except BaseException:
            self.pool.shutdown(cancel_futures=True)
            raise

    def __enter__(self) -> _Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    def step(self, i: int) -> Step:
        return self.pool.submit(_step, i).result()

    def memory(self) -> tuple[float, float]:
        return self.pool.submit(_memory).result()


def _round(worker: _Worker, erm: _Worker, i: int, erm_first: bool) -> tuple[Step, Step]:
    """(the method's step, ERM's step) on batch i, one after the other."""
    if erm_first:
        e = erm.step(i)
        return worker.step(i), e
    w = worker.step(i)
    return w, erm.step(i)


def _seconds(steps: Iterable[Step]) -> list[float]:
    return [t for t, _, _ in steps]


def _cost(times: list[float], erm_times: list[float], memory: tuple[float, float]) -> dict[str, Any]:
    """A method's cost.json entry: its step times, ERM's beside them, and its peak memory (total, over the model)."""
    return {"step_time_s": statistics.median(times), "step_times_s": times, "erm_step_times_s": erm_times,
            "peak_mb": memory[1], "peak_total_mb": memory[0]}


@task(cache_policy=NO_CACHE)
def measure_cost(params: Params) -> dict[str, Any]:
    """Each of Table 1's methods against ERM, step beside step: one ERM process stays loaded; each other method in
    turn gets its own process and `experiment.cost_steps` rounds, in each of which it and ERM step once on the
    round's batch, alternately first. A method's ratio to ERM in a round is then paired by batch and by the minute,
    and the machine's drift over the stage (2-3x between sittings at 986f5fe, when the methods ran one after the
    other) cancels. Two processes at a time: all ten at once (each ~2.5 GB after its first steps) ran a 23 GB
    machine out of memory."""
    methods = list(dict.fromkeys(params.experiment.runs[r].method for r in params.experiment.table1))
    if "erm" not in methods:
        raise ConfigError(f"experiment.table1 has no run of method erm, which Table 3 is relative to: {methods}")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    rounds = range(WARMUP_STEPS, WARMUP_STEPS + params.experiment.cost_steps)
    paired: dict[str, list[tuple[Step, Step]]] = {}  # each method's (its step, ERM's step) of every round
    memory = {}
    log = get_run_logger()
    with _Worker(params, "erm", context) as erm:
        for m in [x for x in methods if x != "erm"]:
            with _Worker(params, m, context) as worker:
                paired[m] = [_round(worker, erm, i, erm_first=k % 2 == 0) for k, i in enumerate(rounds)]
                memory[m] = worker.memory()
            log.info("%s: %.2f s per step (median of %d rounds), ERM beside it %.2f s, peak +%.0f MB", m,
                     statistics.median(_seconds(s for s, _ in paired[m])), len(rounds),
                     statistics.median(_seconds(e for _, e in paired[m])), memory[m][1])
        erm_steps = [e for steps in paired.values() for _, e in steps] or [erm.step(i) for i in rounds]  # ERM alone
        memory["erm"] = erm.memory()
    costs = {m: _cost(_seconds(s for s, _ in steps), _seconds(e for _, e in steps), memory[m])
             for m, steps in paired.items()}
    costs["erm"] = _cost(_seconds(erm_steps), _seconds(erm_steps), memory["erm"])
    device = resolve_device(params.train.device)
    result = {"methods": {m: costs[m] for m in methods},
              "runs": {r: params.experiment.runs[r].method for r in params.experiment.table1},
              "device": device.type, "machine": describe(device), "threads": params.train.threads,
              "warmup_steps": WARMUP_STEPS, "sequences": erm_steps[0][2],
              "tokens": [n for _, n, _ in erm_steps[:len(rounds)]]}  # each round's batch, the same in every block
    write_json(COST, result)
    return result
