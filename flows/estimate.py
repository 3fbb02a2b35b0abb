"""`python -m flows.estimate`: the teacher's calls, tokens and cost, estimated before a run (no calls)."""
from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.teacher import estimate_teacher, read_seeds


@flow(name="estimate")
def estimate_flow(params_path: str = str(PARAMS_FILE)) -> dict:
    params = load_params(params_path)
    return estimate_teacher(params, read_seeds())


if __name__ == "__main__":
    main(estimate_flow)
