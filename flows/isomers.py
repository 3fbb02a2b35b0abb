from prefect import flow, unmapped

from flows._cli import main
from iga.params import PARAMS_FILE, load_params, require_teacher_credentials
from tasks.teacher import chunks, read_seeds, teach_chunk, write_isomers


@flow(name="isomers")
def isomers_flow(params_path: str = str(PARAMS_FILE)) -> None:
    params = load_params(params_path)
    require_teacher_credentials(params)
    seeds = read_seeds()
    teach = teach_chunk.with_options(retries=params.teacher.task_retries)
    results = teach.map(chunks(seeds, params.teacher.chunk_size), unmapped(params)).result()
    write_isomers([d for dags, _ in results for d in dags], [r for _, rows in results for r in rows])


if __name__ == "__main__":
    main(isomers_flow, needs_teacher=True)
