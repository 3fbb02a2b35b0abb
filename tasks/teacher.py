"""Teacher calls, a chunk of seeds (or regeneration requests) per task: a submitted Prefect task
costs ~90 ms, so one task per call would cost more than a procedural call itself."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.io import read_jsonl, write_jsonl
from iga.params import Params
from iga.teacher import make_teacher
from tasks.paths import DAGS, INSTANCES, SEEDS

Row = dict[str, Any]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@task(cache_policy=NO_CACHE)
def read_seeds() -> list[Row]:
    return read_jsonl(SEEDS)


@task(cache_policy=NO_CACHE)
def teach_chunk(seeds: list[Row], params: Params) -> tuple[list[Row], list[Row]]:
    """Extract each seed's DAG and instantiate it once in every domain (attempt 1)."""
    teacher = make_teacher(params)
    dags, rows = [], []
    for seed in seeds:
        extraction = teacher.extraction(seed)
        dags.append(extraction)
        rows += [teacher.isomer(seed, extraction, d, attempt=1) for d in params.domains.all]
    return dags, rows


@task(cache_policy=NO_CACHE)
def regenerate_chunk(requests: list[tuple[Row, Row, str, int]], params: Params) -> list[Row]:
    """New attempts for rejected instances: (seed, extraction, domain, attempt) each."""
    teacher = make_teacher(params)
    return [teacher.isomer(seed, extraction, domain, attempt) for seed, extraction, domain, attempt in requests]


@task(cache_policy=NO_CACHE)
def write_isomers(dags: list[Row], rows: list[Row]) -> None:
    write_jsonl(DAGS, dags)
    write_jsonl(INSTANCES, rows)
    failed = sum(r["error"] is not None for r in rows)
    get_run_logger().info("%d DAGs (%d failed), %d instances (%d teacher errors) -> %s",
                          len(dags), sum(d["error"] is not None for d in dags), len(rows), failed, INSTANCES)
