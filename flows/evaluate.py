"""`python -m flows.evaluate <method>` evaluates one trained method; without an argument, every
method in `train.methods`."""
import sys

from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks.evaluate import evaluate_method


@flow(name="evaluate")
def evaluate_flow(params_path: str = str(PARAMS_FILE), method: str | None = None) -> dict:
    params = load_params(params_path)
    return {m: evaluate_method(params, m) for m in ([method] if method else params.train.methods)}


if __name__ == "__main__":
    main(evaluate_flow, method=sys.argv[1] if len(sys.argv) > 1 else None)
