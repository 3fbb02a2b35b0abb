"""`python -m flows.experiment`: every run of experiment.table1 and table2 x experiment.seeds, trained and
evaluated (finished ones skipped), each method's cost on one batch, then reports/table{1,2,3}.md."""
from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks import tracking
from tasks.experiment import measure_cost, open_parent, run_one, write_tables


@flow(name="experiment")
def experiment_flow(params_path: str = str(PARAMS_FILE)) -> list[str]:
    params = load_params(params_path)
    ex = params.experiment
    tracking.check_reachable()
    parent = open_parent(params)
    runs = dict.fromkeys(ex.table1 + ex.table2)
    results = [run_one(params, name, seed, parent) for name in runs for seed in ex.seeds]
    return [str(p) for p in write_tables(params, results, measure_cost(params), parent)]


if __name__ == "__main__":
    print("\n".join(main(experiment_flow)))
