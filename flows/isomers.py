from prefect import flow, unmapped
from prefect.futures import wait

from flows._cli import main
from iga.params import PARAMS_FILE, load_params, require_teacher_credentials
from tasks.paths import ISOMERS_LEDGER
from tasks.teacher import chunks, close_teacher, open_teacher, read_seeds, teach_chunk, write_isomers


@flow(name="isomers")
def isomers_flow(params_path: str = str(PARAMS_FILE)) -> None:
    params = load_params(params_path)
    require_teacher_credentials(params)
    seeds = read_seeds()
    teacher = open_teacher(params)
    teach = teach_chunk.with_options(retries=params.teacher.task_retries)
    futures = teach.map(chunks(seeds, params.teacher.chunk_size), unmapped(teacher))
    try:
        results = futures.result()
    finally:  # after a stop (budget, HTTP 401), once every chunk has stopped too
        wait(futures)
        close_teacher(teacher, ISOMERS_LEDGER)
    write_isomers([d for dags, _ in results for d in dags], [r for _, rows in results for r in rows])


if __name__ == "__main__":
    main(isomers_flow, needs_teacher=True)
