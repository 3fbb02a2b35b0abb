"""`python -m flows.select [strategy]`: which candidate CoT each training instance keeps. Without an argument the
demo's `select` stage (select.strategy, data/select/train.jsonl); with one, dvc.yaml's `selected@<strategy>`, the
training data of the experiment's runs whose `select` is that strategy (data/select/<strategy>/)."""
import dataclasses
import sys
from typing import get_args

from prefect import flow, unmapped
from prefect.futures import wait

from flows._cli import main
from iga.params import PARAMS_FILE, Strategy, load_params, require_teacher_credentials
from tasks.paths import GATE_LEDGER, ISOMERS_LEDGER, selected_outputs
from tasks.select import choose_and_write, read_training
from tasks.teacher import chunks, close_teacher, open_teacher, sample_chunk

STRATEGIES = get_args(Strategy)


@flow(name="select")
def select_flow(params_path: str = str(PARAMS_FILE), strategy: str | None = None) -> dict:
    params = load_params(params_path)
    out = selected_outputs(strategy)
    if strategy is not None:
        params = dataclasses.replace(params, select=dataclasses.replace(params.select, strategy=strategy))
    jobs = read_training()
    if params.select.strategy == "first":  # the split's training data as it is: no teacher needed
        return choose_and_write(params, jobs, out)
    require_teacher_credentials(params)
    teacher = open_teacher(params, ISOMERS_LEDGER, GATE_LEDGER)
    sample = sample_chunk.with_options(retries=params.teacher.task_retries)
    futures = sample.map(chunks(jobs, params.teacher.chunk_size), unmapped(teacher), unmapped(params.teacher.samples))
    try:
        candidates = [c for chunk in futures.result() for c in chunk]
    finally:  # the ledger is written after a stop too: what was paid is accounted for
        wait(futures)
        close_teacher(teacher, out["ledger"])
    return choose_and_write(params, jobs, out, candidates)


def strategy_arg() -> str | None:
    """The strategy named on the command line (None: select.strategy); anything else exits 2 with the usage."""
    args = sys.argv[1:]
    if len(args) <= 1 and set(args) <= set(STRATEGIES):
        return args[0] if args else None
    print(f"error: usage: python -m flows.select [{' | '.join(STRATEGIES)}], got {' '.join(args)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    chosen = strategy_arg()
    main(select_flow, needs_teacher=lambda params: (chosen or params.select.strategy) != "first", strategy=chosen)
