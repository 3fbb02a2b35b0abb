from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.data.health import check_split
from iga.data.split import LEAKAGE_WARNING, split
from iga.io import read_jsonl, write_json, write_jsonl
from iga.params import Params
from tasks.paths import ACCEPTED, OOD, SPLIT_METRICS, TEST, TRAIN


@task(cache_policy=NO_CACHE)
def split_accepted(params: Params) -> dict[str, Any]:
    log = get_run_logger()
    if params.split.unit == "instance":
        log.warning(LEAKAGE_WARNING)
    sides, metrics = split(read_jsonl(ACCEPTED), params.split, params.domains)
    if params.split.unit == "instance":
        metrics["warning"] = LEAKAGE_WARNING
    for path, side in ((TRAIN, "train"), (TEST, "test"), (OOD, "ood")):
        write_jsonl(path, sides[side])
    write_json(SPLIT_METRICS, metrics)
    log.info("split by %s: %d train / %d test seeds; rows %s", params.split.unit, metrics["seeds_train"],
             metrics["seeds_test"], metrics["rows"])
    check_split(metrics)  # after the writes: the files show what went wrong
    return metrics
