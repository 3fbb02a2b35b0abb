"""`python -m flows.run <run> <draw> <seed>`: one (run, hyperparameter draw, training seed) of the experiment,
trained and evaluated, its outputs written to experiments/runs/<run>/draw<draw>/seed<seed>/. The command of
dvc.yaml's `run@<run>-d0-s<seed>` and `sweep@<run>-d<draw>-s<seed>` stages."""
import sys

from prefect import flow

from flows._cli import main
from iga.errors import ConfigError
from iga.experiment.sweep import Pair
from iga.params import PARAMS_FILE, load_params
from tasks import tracking
from tasks.experiment import run_one


@flow(name="experiment-pair")
def run_flow(params_path: str, run: str, draw: int, seed: int) -> str:
    pair = Pair(run, draw, seed)
    tracking.check_reachable()
    run_one(load_params(params_path), pair)
    return pair.stage


def launch(params_path: str = str(PARAMS_FILE)) -> str:
    """The pair named on the command line, checked before Prefect starts."""
    args = sys.argv[1:]
    if len(args) != 3 or not all(a.isdigit() for a in args[1:]):
        raise ConfigError(f"usage: python -m flows.run <run> <draw> <seed>, got {' '.join(args) or 'nothing'}")
    if args[0] not in load_params(params_path).experiment.runs:
        raise ConfigError(f"params: no run {args[0]!r} under experiment.runs")
    return run_flow(params_path, args[0], int(args[1]), int(args[2]))


if __name__ == "__main__":
    main(launch)
