"""`python -m flows.tables`: Tables 1-3 (reports/table{1,2,3}.md, reports/experiment/) from the pairs' outputs
and Table 3's costs, each Table 1 run's draw selected by training-domain validation (DVC stage `tables`). Before
the whole matrix has run (`dvc repro -s tables`), each table shows what has, and says so."""
from prefect import flow

from flows._cli import main
from iga.params import PARAMS_FILE, load_params
from tasks import tracking
from tasks.tables import load_results, write_tables


@flow(name="tables")
def tables_flow(params_path: str = str(PARAMS_FILE)) -> list[str]:
    params = load_params(params_path)
    tracking.check_reachable()
    return [str(p) for p in write_tables(params, *load_results(params))]


if __name__ == "__main__":
    print("\n".join(main(tables_flow)))
