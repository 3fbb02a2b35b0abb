"""The data half of the lifecycle in one process: seeds -> isomers -> gate -> split."""
from prefect import flow

from flows._cli import main
from flows.gate import gate_flow
from flows.isomers import isomers_flow
from flows.seeds import seeds_flow
from flows.split import split_flow
from iga.params import PARAMS_FILE


@flow(name="data")
def data_flow(params_path: str = str(PARAMS_FILE)) -> dict:
    seeds_flow(params_path)
    isomers_flow(params_path)
    gate = gate_flow(params_path)
    return {"gate": gate, "split": split_flow(params_path)}


if __name__ == "__main__":
    main(data_flow, needs_teacher=True)
