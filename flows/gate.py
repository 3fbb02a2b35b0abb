from functools import partial

from prefect import flow, unmapped
from prefect.futures import wait

from flows._cli import main
from iga.data.regenerate import regenerate
from iga.params import PARAMS_FILE, load_params, require_teacher_credentials
from tasks.gate import open_gate, read_gate_inputs, validate, write_gate_outputs
from tasks.paths import GATE_LEDGER, ISOMERS_LEDGER
from tasks.teacher import chunks, close_teacher, open_teacher, reextract_chunk, regenerate_chunk, write_teacher_metrics


@flow(name="gate")
def gate_flow(params_path: str = str(PARAMS_FILE)) -> dict:
    """GX gates -> regenerate the rejected (and the DAG of a seed that has none) -> gates again, up to
    gate.max_attempts; then drop."""
    params = load_params(params_path)
    require_teacher_credentials(params)
    seeds, dags, rows = read_gate_inputs()
    gate = open_gate(params)
    teacher = open_teacher(params, ISOMERS_LEDGER)

    def over_chunks(chunk_task):
        """The teacher calls of one round, mapped over chunks of teacher.chunk_size, each chunk a retried task."""
        retried = chunk_task.with_options(retries=params.teacher.task_retries)

        def call(requests: list) -> list:
            futures = retried.map(chunks(requests, params.teacher.chunk_size), unmapped(teacher))
            wait(futures)  # every chunk finished or stopped before the teacher may close
            return [row for result in futures.result() for row in result]

        return call

    try:
        outcome = regenerate(rows, seeds, dags, params.gate.max_attempts, partial(validate, gate),
                             over_chunks(reextract_chunk), over_chunks(regenerate_chunk))
    finally:
        close_teacher(teacher, GATE_LEDGER)
    write_teacher_metrics(params, {"isomers": ISOMERS_LEDGER, "gate": GATE_LEDGER})
    return write_gate_outputs(outcome, params)


if __name__ == "__main__":
    main(gate_flow, needs_teacher=True)
