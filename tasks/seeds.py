from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.seeds import make_seeds
from iga.io import write_jsonl
from iga.params import Params
from tasks.paths import SEEDS


@task(cache_policy=NO_CACHE)
def build_seeds(params: Params) -> int:
    rows = make_seeds(params.seeds)
    write_jsonl(SEEDS, rows)
    get_run_logger().info("%d seeds from %s -> %s", len(rows), params.seeds.source, SEEDS)
    return len(rows)
