from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.io import atomic_dir, write_json
from iga.params import Params
from iga.train.student import prepare_base
from tasks.paths import BASE_MODEL, STUDENT_METRICS


@task(cache_policy=NO_CACHE)
def write_base_model(params: Params) -> dict:
    with atomic_dir(BASE_MODEL) as tmp:
        info = prepare_base(params.student.base, tmp)
    write_json(STUDENT_METRICS, info)
    get_run_logger().info("base model %s (%d parameters) -> %s", info["base"], info["parameters"], BASE_MODEL)
    return info
