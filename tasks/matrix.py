"""The experiment's matrix around DVC: experiments/pairs.yaml written from params.yaml, `dvc repro`, what `dvc
status` says is missing, and the Ray runner (the missing pairs as Ray tasks, each recorded with `dvc commit`
as it arrives, so that dvc.lock says it is done exactly as if `dvc repro` had run it)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from iga.experiment.pairs import differences, dvc_pairs, render
from iga.experiment.sweep import Pair, matrix
from iga.io import atomic_write_text
from iga.params import Params
from tasks import tracking
from tasks.dvc import dvc
from tasks.paths import PAIRS

EXPERIMENT_STAGES = ("run@", "sweep@", "cost", "tables")  # prefixes of the stages the experiment adds
RunPair = Callable[[Params, Pair, str, int], dict[str, Any]]  # tasks.experiment.run_pair
WritePair = Callable[[Pair, dict[str, Any]], None]  # tasks.experiment.write_pair


def write_pairs(params: Params) -> dict[str, list[str]]:
    """experiments/pairs.yaml from params.yaml, rewritten only when it differs; the pair stages that changed
    (pairs.differences: missing before, extra before, changed)."""
    items = dvc_pairs(params)
    changes = differences(yaml.safe_load(PAIRS.read_text())["pairs"] if PAIRS.is_file() else None, items)
    if any(changes.values()):
        atomic_write_text(PAIRS, render(items))
    return {"added": changes["missing"], "removed": changes["extra"], "changed": changes["changed"]}


@task(cache_policy=NO_CACHE)
def sync_pairs(params: Params) -> None:
    changes = write_pairs(params)
    if any(changes.values()):
        get_run_logger().info("%s rewritten: %s (commit it with the outputs)", PAIRS,
                              ", ".join(f"{len(v)} pair stages {k}" for k, v in changes.items()))


@task(cache_policy=NO_CACHE)
def open_parent() -> str:
    """The experiment's parent MLflow run, found or created before any pair runs: none of them races to create it."""
    return tracking.experiment_parent()


@task(cache_policy=NO_CACHE)
def reproduce(target: str) -> None:
    """`dvc repro <target>`: DVC runs what is missing or stale, one stage after the other, and records each in
    dvc.lock as it finishes: a stopped repro keeps every finished pair."""
    dvc("repro", target)


def stale(target: str) -> list[str]:
    """The stages `dvc status` finds changed or never run among `target` and its upstream stages."""
    return list(json.loads(dvc("status", "--json", "--with-deps", target, capture=True).stdout or "{}"))


def _on_ray_worker(run_pair: RunPair, params: Params, pair: Pair, parent_run_id: str, workdir: str
                   ) -> dict[str, Any]:
    """One pair in a Ray worker: from the project checkout (the flow's directory, at the same path on every
    node: data/, models/ and a relative sqlite MLflow URI resolve there) with torch threads = the task's CPUs."""
    os.chdir(workdir)
    return run_pair(params, pair, parent_run_id, params.experiment.ray.resources.num_cpus)


@task(cache_policy=NO_CACHE)
def run_on_ray(params: Params, parent_run_id: str, run_pair: RunPair, write_pair: WritePair) -> list[str]:
    """Runner ray: the stages upstream of the pairs brought up to date (`dvc repro`), then every pair `dvc status`
    lists as a Ray task reserving experiment.ray.resources, as many at once as the cluster fits. Each result comes
    back here, is written and recorded (`dvc commit`) as it arrives: a killed matrix resumes from the finished
    ones, and a cluster needs no shared experiments/ folder. A failed pair fails the task after the others finish.
    Returns the stages run.

    Ray directly, not prefect-ray's RayTaskRunner. Measured on this 2-core machine against a running head
    (`ray start`), attaching and running 2 tiny tasks: Ray 0.9-3.2 s cold (worker start), 10 ms warm;
    RayTaskRunner 4.4-7.3 s cold, 0.4 s warm, as each worker runs Prefect's task engine and reports to the
    Prefect API (which then must be reachable from every node: a local run's ephemeral server is not). Both
    are small beside a run (minutes); what decides is that a task runner is fixed when the flow is defined,
    while experiment.runner is read when it runs, and that workers here need nothing but Ray and MLflow."""
    log = get_run_logger()
    upstream = [s for s in stale("tables") if not s.startswith(EXPERIMENT_STAGES)]
    if upstream:
        log.info("bringing the pairs' inputs up to date first: dvc repro %s", " ".join(upstream))
        dvc("repro", *upstream)
    todo = set(stale("tables"))
    pairs = [pair for pair in matrix(params) if pair.stage in todo]
    if pairs:
        _on_ray(params, pairs, parent_run_id, run_pair, write_pair, log)
    return [pair.stage for pair in pairs]


def _on_ray(params: Params, pairs: list[Pair], parent_run_id: str, run_pair: RunPair, write_pair: WritePair,
            log: Any) -> None:
    import ray

    ray_params = params.experiment.ray
    # Workers inherit the environment of the node's `ray start`, not this process's: the job passes MLflow's.
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "MLFLOW_EXPERIMENT_NAME": os.environ.get("MLFLOW_EXPERIMENT_NAME", tracking.DEFAULT_EXPERIMENT)}
    local = ray_params.address is None
    ray.init(address="local" if local else ray_params.address, runtime_env={"env_vars": env},
             **({"include_dashboard": False} if local else {}))
    try:
        log.info("Ray: %d pairs on %s (%s CPUs), %d CPUs and %g GPUs each", len(pairs), ray_params.address or "a "
                 "local instance", ray.cluster_resources().get("CPU", 0), ray_params.resources.num_cpus,
                 ray_params.resources.num_gpus)
        if sum(node["Alive"] for node in ray.nodes()) > 1 and not env["MLFLOW_TRACKING_URI"].startswith("http"):
            log.warning("MLFLOW_TRACKING_URI is %s: the runs on other nodes log to their own copy of it, not under "
                        "the parent run; use an MLflow server on a multi-node cluster (docs/experiment.md)",
                        env["MLFLOW_TRACKING_URI"])
        task_ = ray.remote(_on_ray_worker).options(num_cpus=ray_params.resources.num_cpus,
                                                   num_gpus=ray_params.resources.num_gpus)
        workdir = str(Path.cwd().resolve())
        refs = {task_.remote(run_pair, params, pair, parent_run_id, workdir): pair for pair in pairs}
        failed, pending = [], list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            pair = refs[done[0]]
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as e:
                failed.append((pair, e))
                log.error("%s failed on Ray: %s", pair.stage, e)
                continue
            write_pair(pair, result)
            dvc("commit", "--force", "--quiet", pair.stage)  # dvc.lock: this pair is done
            log.info("%s: written and committed (%d of %d)", pair.stage, len(refs) - len(pending) - len(failed),
                     len(refs))
    finally:
        ray.shutdown()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pairs)} pairs failed on Ray: "
                           f"{', '.join(pair.stage for pair, _ in failed)}") from failed[0][1]
