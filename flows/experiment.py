"""`python -m flows.experiment`: every (run, hyperparameter draw, seed) of experiment.table1 and table2, trained and
evaluated (finished ones skipped) here or on Ray (experiment.runner), each method's cost on one batch, then
reports/table{1,2,3}.md with each Table 1 run's draw selected by training-domain validation."""
from prefect import flow

from flows._cli import main
from iga.experiment.sweep import matrix
from iga.params import PARAMS_FILE, load_params
from tasks import tracking
from tasks.experiment import measure_cost, open_parent, run_on_ray, run_one, write_tables


@flow(name="experiment")
def experiment_flow(params_path: str = str(PARAMS_FILE)) -> list[str]:
    params = load_params(params_path)
    tracking.check_reachable()
    parent = open_parent(params)
    pairs = matrix(params)
    if params.experiment.runner == "ray":
        results = run_on_ray(params, pairs, parent)
    else:
        results = [run_one(params, *pair, parent) for pair in pairs]
    return [str(p) for p in write_tables(params, results, measure_cost(params), parent)]


if __name__ == "__main__":
    print("\n".join(main(experiment_flow)))
