"""`python -m flows.select`: which candidate CoT each training instance keeps (select.strategy)."""
from prefect import flow, unmapped
from prefect.futures import wait

from flows._cli import main
from iga.params import PARAMS_FILE, load_params, require_teacher_credentials
from tasks.paths import GATE_LEDGER, ISOMERS_LEDGER, SELECT_LEDGER
from tasks.select import choose_and_write, read_training
from tasks.teacher import chunks, close_teacher, open_teacher, sample_chunk


@flow(name="select")
def select_flow(params_path: str = str(PARAMS_FILE)) -> dict:
    params = load_params(params_path)
    jobs = read_training()
    if params.select.strategy == "first":  # the split's training data as it is: no teacher needed
        return choose_and_write(params, jobs)
    require_teacher_credentials(params)
    teacher = open_teacher(params, ISOMERS_LEDGER, GATE_LEDGER)
    sample = sample_chunk.with_options(retries=params.teacher.task_retries)
    futures = sample.map(chunks(jobs, params.teacher.chunk_size), unmapped(teacher), unmapped(params.teacher.samples))
    try:
        candidates = [c for chunk in futures.result() for c in chunk]
    finally:  # the ledger is written after a stop too: what was paid is accounted for
        wait(futures)
        close_teacher(teacher, SELECT_LEDGER)
    return choose_and_write(params, jobs, candidates)


if __name__ == "__main__":
    main(select_flow, needs_teacher=lambda params: params.select.strategy != "first")
