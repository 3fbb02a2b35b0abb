"""Real Prefect, MLflow and S3 (moto) servers for tests, each a subprocess on a free loopback port.

All of a server's files (database, artifacts, log file) live in the directory the caller gives
(moto keeps its buckets in memory). The server runs in its own session (process group), so on exit
the whole group is stopped: first SIGTERM and a grace period, then SIGKILL for anything left. If the
server dies or does not become healthy in time, the context manager raises with the tail of the
server's log.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The CLIs installed next to the running interpreter, i.e. from the same virtual environment.
BIN = Path(sys.executable).parent
# Start-up measured 6-11 s on an idle 2-core machine (imports, database set-up); far more when the
# cores are busy, hence the generous limit.
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it; a tiny race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` with PREFECT_HOME=home and a sqlite database under it.

    Yields the API URL ("http://127.0.0.1:PORT/api") to use as PREFECT_API_URL.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = _env(
        # PREFECT_API_DATABASE_CONNECTION_URL is the legacy alias of the setting; when both are
        # set the PREFECT_SERVER_ name wins, so set that one and drop the alias.
        drop=("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE",
              "PREFECT_API_DATABASE_CONNECTION_URL"),
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        DO_NOT_TRACK="true",
    )
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--no-ui", "--analytics-off"]
    api_url = f"http://127.0.0.1:{port}/api"
    with _running(cmd, env, cwd=home, log=home / "server.log", health_url=f"{api_url}/health"):
        yield api_url


@contextmanager
def mlflow_server(root: Path, artifacts_destination: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` with a sqlite backend store under root and a proxied artifact store.

    Yields the tracking URI ("http://127.0.0.1:PORT"). Clients upload artifacts through the server
    (`mlflow-artifacts:/` URIs), so they land in `artifacts_destination` (default root/artifacts;
    e.g. "s3://bucket/path" with `env` = s3_client_env(endpoint)), never in the client's directory,
    and clients need no credentials for that store. `env` is added to the server's environment.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = _env(
        drop=("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"),
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        # By default a sqlite-backed server also launches a huey job-runner process (GenAI jobs,
        # periodic tasks) with its queue in /dev/shm: not needed here and not hermetic.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        **(env or {}),
    )
    # 127.0.0.1 is in the default --allowed-hosts / --cors-allowed-origins, so no security flags
    # are needed; one uvicorn worker instead of the default four keeps it light.
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination",
           artifacts_destination or str(root / "artifacts")]
    url = f"http://127.0.0.1:{port}"
    with _running(cmd, env, cwd=root, log=root / "server.log", health_url=f"{url}/health"):
        yield url


@contextmanager
def s3_server(root: Path) -> Iterator[str]:
    """moto's S3 API (`moto_server`), empty, with its log in root/server.log.

    Yields the endpoint URL ("http://127.0.0.1:PORT"). State is in memory and dies with the server.
    A subprocess rather than moto's in-process ThreadedMotoServer: moto's state is per process, so
    each server starts empty. Any key pair is accepted; bucket names need at least 3 characters.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(BIN / "moto_server"), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with _running(cmd, _env(), cwd=root, log=root / "server.log",
                  health_url=f"{url}/moto-api/data.json"):
        yield url


def s3_client_env(endpoint: str) -> dict[str, str]:
    """What an S3 client (boto3, dvc-s3, mlflow) needs to use `endpoint`: the standard variables
    only (botocore reads the endpoint from AWS_ENDPOINT_URL); any key pair is accepted."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


def _env(drop: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    """A copy of this process's environment without `drop`, with `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(overrides)
    return env


@contextmanager
def _running(cmd: list[str], env: dict[str, str], cwd: Path, log: Path,
             health_url: str) -> Iterator[None]:
    """Run `cmd` in a new session with output to `log`, wait for `health_url`, stop it on exit."""
    # The server writes to a file, not a pipe nobody reads (a full pipe would block it).
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(proc, health_url, log)
        yield
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Poll `url` until it answers 200; raise with the log's tail on exit or time-out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} during start-up; "
                               f"log {log}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {START_TIMEOUT_S:.0f} s; "
                       f"log {log}:\n{_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, wait for its leader, then SIGKILL whatever is left."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is already gone


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
