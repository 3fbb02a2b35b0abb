from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.seeds import build_seeds


@flow(name="seeds")
def seeds_flow(params_path: str = str(PARAMS_FILE)) -> int:
    return build_seeds(load_params(params_path))


if __name__ == "__main__":
    main(seeds_flow)
