"""`python -m flows.experiment`: the whole experiment, Tables 1-3. experiments/pairs.yaml from params.yaml (one
DVC stage per (run, hyperparameter draw, seed)), then what `dvc status` lists as missing: with runner local,
`dvc repro tables` runs the pairs one by one; with runner ray, the pairs run as Ray tasks, each recorded with
`dvc commit`, and `dvc repro tables` does the rest. dvc.lock records each pair as it finishes, so a stopped
matrix resumes from the last finished pair, here or in another clone.

`python -m flows.experiment pairs` only rewrites experiments/pairs.yaml (after editing params.yaml's matrix)."""
import sys

from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks import tracking
from tasks.matrix import open_parent, reproduce, run_on_ray, sync_pairs, write_pairs
from tasks.paths import PAIRS, TABLES


@flow(name="experiment")
def experiment_flow(params_path: str = str(PARAMS_FILE)) -> list[str]:
    params = load_params(params_path)
    tracking.check_reachable()
    sync_pairs(params)
    parent = open_parent()
    if params.experiment.runner == "ray":
        from tasks.experiment import run_pair, write_pair  # torch, transformers: not for `pairs` alone

        run_on_ray(params, parent, run_pair, write_pair)
    reproduce("tables")
    return [str(p) for p in TABLES.values()]


def pairs_only(params_path: str = str(PARAMS_FILE)) -> list[str]:
    changes = write_pairs(load_params(params_path))
    return [f"{PAIRS}: " + ", ".join(f"{len(v)} pair stages {k}" for k, v in changes.items()),
            *(f"{k} {s}" for k, stages in changes.items() for s in stages)]


if __name__ == "__main__":
    print("\n".join(main(pairs_only if sys.argv[1:] == ["pairs"] else experiment_flow)))
