from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.student import write_base_model


@flow(name="student")
def student_flow(params_path: str = str(PARAMS_FILE)) -> dict:
    return write_base_model(load_params(params_path))


if __name__ == "__main__":
    main(student_flow)
