"""Shared storage on S3 (docs/storage.md), against a real S3 API on loopback (moto's server): a DVC
remote that a fresh clone pulls byte-identical data and models from, with clear errors for a missing
bucket or a down endpoint; and an MLflow server whose artifact store is a bucket, from which a client
without S3 credentials loads the champion and generates."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
from safetensors.numpy import save_file

from conftest import random_adapter
from servers import free_port, mlflow_server, s3_client_env, s3_server

DVC = [sys.executable, "-m", "dvc"]


def _s3(endpoint: str):
    env = s3_client_env(endpoint)
    return boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _run(args, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _sh(args, cwd, env) -> str:
    proc = _run(args, cwd, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _md5s(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dvc_repo(repo: Path, remote_url: str, env: dict) -> None:
    """A git + DVC repo tracking a small data/ and models/ (a real safetensors file among them), with
    `remote_url` as its default remote: only the URL is in .dvc/config; endpoint and keys come from env."""
    (repo / "data/split").mkdir(parents=True)
    (repo / "data/split/train.jsonl").write_text('{"id": "s000/math", "answer": "42"}\n' * 3)
    (repo / "data/seeds.jsonl").write_text('{"id": "s000"}\n')
    (repo / "models/iga/adapter").mkdir(parents=True)
    save_file({"lora_A": np.random.default_rng(0).standard_normal((4, 8), dtype=np.float32)},
              str(repo / "models/iga/adapter/adapter_model.safetensors"))
    (repo / "models/iga/adapter/adapter_config.json").write_text('{"r": 4}\n')
    for args in (["git", "init", "-q"], ["git", "config", "user.name", "test"],
                 ["git", "config", "user.email", "test@example.invalid"], DVC + ["init", "-q"],
                 DVC + ["add", "data", "models"], DVC + ["remote", "add", "-d", "storage", remote_url],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "data and models"]):
        _sh(args, repo, env)


def test_dvc_push_to_s3_and_pull_into_a_fresh_clone(tmp_path):
    with s3_server(tmp_path / "s3") as endpoint:
        _s3(endpoint).create_bucket(Bucket="iga-dvc")
        env = {**os.environ, **s3_client_env(endpoint)}
        repo, clone = tmp_path / "repo", tmp_path / "clone"
        _dvc_repo(repo, "s3://iga-dvc/dvcstore", env)
        assert "6 files pushed" in _sh(DVC + ["push"], repo, env)  # 4 files and 2 directory listings
        keys = [o["Key"] for o in _s3(endpoint).list_objects_v2(Bucket="iga-dvc")["Contents"]]
        assert len(keys) == 6 and all(k.startswith("dvcstore/files/md5/") for k in keys)

        _sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
        assert not (clone / "data").exists() and not (clone / ".dvc/cache").exists()  # nothing but git
        _sh(DVC + ["pull"], clone, env)
    for tracked in ("data", "models"):
        original = _md5s(repo / tracked)
        assert original and _md5s(clone / tracked) == original
    config = (repo / ".dvc/config").read_text()
    assert "s3://iga-dvc/dvcstore" in config and "127.0.0.1" not in config and "testing" not in config


def test_a_missing_bucket_or_a_down_endpoint_fails_dvc_push_clearly(tmp_path):
    with s3_server(tmp_path / "s3") as endpoint:
        env = {**os.environ, **s3_client_env(endpoint)}
        repo = tmp_path / "repo"
        _dvc_repo(repo, "s3://no-such-bucket/dvcstore", env)
        proc = _run(DVC + ["push"], repo, env)
        assert proc.returncode != 0 and "The specified bucket does not exist" in proc.stderr
    # botocore retries a refused connection (~10 s with its defaults); one attempt is enough here
    env |= {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    proc = _run(DVC + ["push"], repo, env)
    assert proc.returncode != 0 and "Could not connect to the endpoint URL" in proc.stderr


def test_mlflow_artifacts_on_s3_and_the_champion_loads_without_s3_credentials(workdir, tiny_base, monkeypatch):
    from iga.params import load_params
    from iga.report.report import RunResult
    from tasks import tracking
    from tasks.paths import adapter_dir
    from tasks.registry import _adapter_md5, _new_version

    shutil.copytree(tiny_base, workdir / "models/base")
    random_adapter("iga", 0)
    params = load_params("params.yaml")
    name = params.registry.model_name
    # the client (this process) has no S3 credentials or endpoint (conftest): artifacts go through the server
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                "MLFLOW_S3_ENDPOINT_URL"} & set(os.environ)
    with s3_server(workdir / "s3") as endpoint:
        _s3(endpoint).create_bucket(Bucket="iga-mlflow")
        with mlflow_server(workdir / "mlflow", artifacts_destination="s3://iga-mlflow/mlartifacts",
                           env=s3_client_env(endpoint)) as uri:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            mlflow = tracking.mlflow_module()
            try:
                with mlflow.start_run(run_name="storage"):
                    decoding = {"max_new_tokens": 16, "stop": {"lines": None, "answer": True, "line_tokens": 32}}
                    version = _new_version(params, RunResult("iga", 0, {"decoding": decoding}, {}, []),
                                           _adapter_md5(adapter_dir("iga")), "test")
                client = mlflow.MlflowClient()
                client.set_registered_model_alias(name, "champion", version.version)
                model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
                out = model.predict(["What is 2 + 3?", "A train travels 60 km in 1.5 hours. Its speed?"])
            finally:
                mlflow.set_tracking_uri(None)
            assert len(out) == 2 and all(isinstance(s, str) for s in out)

            s3 = _s3(endpoint)
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="iga-mlflow")["Contents"]]
            assert all(k.startswith("mlartifacts/") for k in keys)
            weights = [k for k in keys if k.endswith("/artifacts/adapter/adapter_model.safetensors")]
            assert len(weights) == 1 and any(k.endswith("/MLmodel") for k in keys)
            stored = s3.get_object(Bucket="iga-mlflow", Key=weights[0])["Body"].read()
            assert stored == (adapter_dir("iga") / "adapter_model.safetensors").read_bytes()
    assert not (workdir / "mlflow/artifacts").exists() and not (workdir / "mlruns").exists()
