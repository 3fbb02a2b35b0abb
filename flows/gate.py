from prefect import flow, unmapped
from prefect.futures import wait

from flows._cli import main
from iga.gates import regenerable, retried_rows
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
    regenerate = regenerate_chunk.with_options(retries=params.teacher.task_retries)
    reextract = reextract_chunk.with_options(retries=params.teacher.task_retries)
    retried, regenerated = [], []
    try:
        for attempt in range(2, params.gate.max_attempts + 2):
            rejected = validate(gate, rows)
            keys = regenerable(rejected) if attempt <= params.gate.max_attempts else []
            if not keys:
                break
            retried += retried_rows(rows, rejected, keys)
            seed_of = {(r["group_id"], r["domain"]): r["seed_id"] for r in rows}
            # A seed whose extract or annotate call failed has no DAG to instantiate: ask for it again first.
            lost = sorted({seed_of[k] for k in keys if dags[seed_of[k]]["error"]})
            if lost:
                futures = reextract.map(chunks([(seeds[s], attempt) for s in lost], params.teacher.chunk_size),
                                        unmapped(teacher))
                wait(futures)
                dags |= {d["seed_id"]: d for ds in futures.result() for d in ds}
            requests = [(seeds[seed_of[k]], dags[seed_of[k]], k[1], attempt) for k in keys]
            futures = regenerate.map(chunks(requests, params.teacher.chunk_size), unmapped(teacher))
            wait(futures)  # every chunk finished or stopped before the teacher may close
            new = [r for rs in futures.result() for r in rs]
            regenerated += new
            fresh = {(r["group_id"], r["domain"]): r for r in new}
            rows = [fresh.get((r["group_id"], r["domain"]), r) for r in rows]
    finally:
        close_teacher(teacher, GATE_LEDGER)
    write_teacher_metrics(params, {"isomers": ISOMERS_LEDGER, "gate": GATE_LEDGER})
    return write_gate_outputs(rows, rejected, retried, regenerated, list(dags.values()), params)


if __name__ == "__main__":
    main(gate_flow, needs_teacher=True)
