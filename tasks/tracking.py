"""MLflow: where runs go, and what every run is tagged with (the code and data it ran on)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from iga.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # in the project; MLFLOW_TRACKING_URI overrides
DEFAULT_EXPERIMENT = "iga"  # MLFLOW_EXPERIMENT_NAME overrides


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def mlflow_module():
    """mlflow, pointed at the tracking URI and experiment (imported on first use: ~3 s)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    return mlflow


def experiment_parent() -> str:
    """The experiment's parent run: the oldest active run tagged `experiment = parent` in the tracking experiment,
    created when there is none. The pair stages, Ray workers and the tables stage share no file, and may run on
    other machines logging to the same server: each finds it by its tag. Delete it in MLflow to start anew."""
    mlflow = mlflow_module()
    found = mlflow.search_runs(filter_string="tags.experiment = 'parent'", order_by=["attributes.start_time ASC"],
                               max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name="experiment") as run:
        mlflow.set_tags({"experiment": "parent", "git_commit": git_commit()})
    return run.info.run_id


def check_reachable() -> None:
    """Fail in seconds, before any training, when the tracking server is down or mistyped."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as resp:
            resp.read()
    except (OSError, ValueError) as e:
        raise ConfigError(f"MLFLOW_TRACKING_URI {uri} is unreachable ({e}); start the server "
                          f"(docs/registry.md) or unset MLFLOW_TRACKING_URI to log to {DEFAULT_TRACKING_URI}") from None


def git_commit() -> str:
    """HEAD's commit, with `-dirty` when the working tree differs; `unknown` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def data_hash(path: Path, lock: Path = Path("dvc.lock")) -> str:
    """The md5 that dvc.lock records for `path`; the file's own md5 when no lock lists it."""
    if lock.is_file():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            for out in stage.get("outs", []):
                if out.get("path") == path.as_posix():
                    return out["md5"]
    return hashlib.md5(path.read_bytes()).hexdigest()


def flat_params(prefix: str, obj: Any) -> dict[str, Any]:
    """A params dataclass as flat MLflow params: {"train.lr": 0.0002, ...}."""
    out: dict[str, Any] = {}
    for k, v in (dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj).items():
        if isinstance(v, dict):
            out.update(flat_params(f"{prefix}.{k}", v))
        else:
            out[f"{prefix}.{k}"] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out
