from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.split import split_accepted


@flow(name="split")
def split_flow(params_path: str = str(PARAMS_FILE)) -> dict:
    return split_accepted(load_params(params_path))


if __name__ == "__main__":
    main(split_flow)
