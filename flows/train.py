"""`python -m flows.train <method>` trains one named method (a key of `methods` in params.yaml);
without an argument, every method in `train.methods`, one after the other."""
import sys

from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.train import train_method


@flow(name="train")
def train_flow(params_path: str = str(PARAMS_FILE), method: str | None = None) -> dict:
    params = load_params(params_path)
    return {m: train_method(params, m) for m in ([method] if method else params.train.methods)}


if __name__ == "__main__":
    main(train_flow, method=sys.argv[1] if len(sys.argv) > 1 else None)
