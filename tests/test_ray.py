"""experiment.runner: ray against a real Ray head on loopback (`ray start --head`, 2 CPUs), in a git repository with
the experiment's DVC stages (tests/test_experiment.py): two (run, draw, seed) pairs of the tiny student run at once
(1 CPU and 1 torch thread each), fill the outputs their DVC stages declare and are recorded with `dvc commit`, so
that `dvc status` has nothing left; their MLflow runs nest under the parent run though created in Ray workers; the
tables follow; a re-run of the flow runs nothing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml
from servers import free_port
from test_experiment import experiment_repo, stale, tools_env

from iga.experiment.sweep import Pair
from tasks.paths import TABLES, pair_outputs

RAY = Path(sys.executable).parent / "ray"
START_TIMEOUT_S = 120.0  # `ray start` took 11-19 s on this 2-core machine under load
STOP_GRACE_S = 5.0  # SIGTERM makes a head drain for up to 30 s: a test head has nothing to drain


@contextmanager
def ray_head(num_cpus: int) -> Iterator[Callable[[], str]]:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir, in its own process group. Yields a
    function that waits until the head is up and returns the address to join. On exit, SIGTERM then SIGKILL
    to the group, then SIGKILL to whatever still names the temp dir (Ray's workers run in sessions of their
    own), and wait until nothing does."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    port = free_port()
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats",
           "--temp-dir", str(temp), "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port())]  # no fixed ports: another head may run beside it
    log = temp / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed or hung ({proc.returncode}); {log}:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        return f"127.0.0.1:{port}"

    try:
        yield ready
    finally:
        _stop(proc, temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def head() -> Iterator[Callable[[], str]]:
    """A 2-CPU head, requested first so that it boots while the Prefect server and the tiny student do."""
    with ray_head(num_cpus=2) as ready:
        yield ready


def _stop(proc: subprocess.Popen, temp: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while left := _naming(temp):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray processes still running after the head stopped: {left}")
        time.sleep(0.5)


def _naming(temp: Path) -> list[int]:
    """Processes whose command line names `temp`: this head's, and only its."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(temp).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass  # exited meanwhile
    return pids


def test_ray_runner_fills_the_pair_outputs_at_once_commits_them_and_nests_their_mlflow_runs(
        head, prefect_api_url, tmp_path, tiny_base, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.experiment import experiment_flow

    env = tools_env(tmp_path, prefect_api_url)
    repo = tmp_path / "repo"
    experiment_repo(repo, {"experiment.runner": "ray",
                           "experiment.ray": {"address": head(), "resources": {"num_cpus": 1, "num_gpus": 0}},
                           "experiment.seeds": [0], "experiment.hparam_draws": 1, "experiment.steps": 2,
                           "experiment.eval_groups": 2, "experiment.max_new_tokens": 8, "experiment.cost_steps": 1,
                           "experiment.table1": ["erm", "iga"], "experiment.table2": ["iga"],
                           "experiment.oracle": None}, tiny_base, env)  # two pairs, side by side
    pairs = [Pair("erm", 0, 0), Pair("iga", 0, 0)]
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # absolute: the workers get it from the job
    experiment_flow("params.yaml")
    results = [json.loads(pair_outputs(*pair)["metrics"].read_text()) for pair in pairs]
    ran = [r["ran"] for r in results]
    assert max(r["start"] for r in ran) < min(r["end"] for r in ran), ran  # the two ran at the same time
    assert [r["threads"] for r in ran] == [1, 1]  # torch threads = the task's num_cpus
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    assert {pair.stage for pair in pairs} <= set(lock) and stale(repo, env) == set()  # committed as DVC records a run
    assert all(TABLES[n].is_file() for n in (1, 2, 3)) and "| erm |" in TABLES[1].read_text()
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (parent,) = client.search_runs([client.get_experiment_by_name("iga").experiment_id], "tags.experiment = 'parent'")
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    children = client.search_runs([parent.info.experiment_id], query)
    assert sorted(c.info.run_name for c in children) == ["erm/draw0/seed0", "iga/draw0/seed0"]
    assert {c.info.status for c in children} == {"FINISHED"}

    mtimes = [p.stat().st_mtime_ns for pair in pairs for p in pair_outputs(*pair).values()]
    experiment_flow("params.yaml")  # nothing stale: no Ray, no pair, no table
    assert [p.stat().st_mtime_ns for pair in pairs for p in pair_outputs(*pair).values()] == mtimes
    assert len(client.search_runs([parent.info.experiment_id], query)) == 2
