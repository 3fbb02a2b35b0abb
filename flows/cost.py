"""`python -m flows.cost`: Table 3's measurements, each of Table 1's methods' step time and peak memory on one
batch, to experiments/cost.json (DVC stage `cost`)."""
from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.cost import measure_cost


@flow(name="cost")
def cost_flow(params_path: str = str(PARAMS_FILE)) -> dict:
    return measure_cost(load_params(params_path))


if __name__ == "__main__":
    main(cost_flow)
