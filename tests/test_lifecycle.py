"""The lifecycle as users run it on a schedule: a Prefect deployment served against a real `prefect
server`, logging to a real `mlflow server`, executing `dvc repro` in a git repo (tiny student); then the
registry's champion loads by alias and generates, and a second run registers nothing new. Then, on the
same repo (one lifecycle run serves both checks), `dvc repro` runs only what a param reaches."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import DVC, copy_project, ran, sh, write_params
from servers import mlflow_server, prefect_server

CRON = "30 4 * * 2"


def _git_dvc_repo(repo: Path, env: dict) -> None:
    repo.mkdir()
    copy_project(repo)
    write_params(repo, {"schedule.cron": CRON})
    for args in (["git", "init", "-q"], ["git", "config", "user.name", "test"],
                 ["git", "config", "user.email", "test@example.invalid"], DVC + ["init", "-q"]):
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)


def test_scheduled_lifecycle_on_real_prefect_and_mlflow_servers(tmp_path):
    import mlflow
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = tmp_path / "repo"
    with prefect_server(tmp_path / "prefect") as api, mlflow_server(tmp_path / "mlflow") as tracking_uri:
        env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking_uri,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        _git_dvc_repo(repo, env)
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "flows.lifecycle", "serve"], cwd=repo, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with temporary_settings({PREFECT_API_URL: api}):
                with get_client(sync_client=True) as client:
                    deadline = time.monotonic() + 120
                    while True:
                        try:
                            deployment = client.read_deployment_by_name("lifecycle/scheduled")
                            break
                        except ObjectNotFound:
                            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                            time.sleep(1)
                schedule = deployment.schedules[0].schedule
                assert (schedule.cron, schedule.timezone) == (CRON, "UTC")
                first = run_deployment("lifecycle/scheduled", timeout=900, poll_interval=2)
                assert first.state.is_completed(), log.read_text()[-5000:]
                second = run_deployment("lifecycle/scheduled", timeout=600, poll_interval=2)
                assert second.state.is_completed(), log.read_text()[-5000:]
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=30)

        # dvc.lock is the record of what ran; the report is on disk
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert set(lock) == {"seeds", "isomers", "gate", "split", "student", "select", "train@erm", "train@iga",
                             "evaluate@erm", "evaluate@iga"}  # every stage of the lifecycle, nothing else
        assert (repo / "reports" / "summary.md").is_file() and (repo / "reports" / "accuracy.png").is_file()
        assert "| Method |" in (repo / "reports" / "summary.md").read_text()
        assert (repo / "models/iga/adapter/adapter_model.safetensors").is_file()
        assert (repo / "models/erm/completions.jsonl").is_file() and (repo / "data/split/train.jsonl").is_file()

        # set_tracking_uri also exports MLFLOW_TRACKING_URI: unset both at the end, or later tests
        # in this process would log to this (then stopped) server
        mlflow.set_tracking_uri(tracking_uri)
        try:
            client = mlflow.MlflowClient()
            experiment = client.get_experiment_by_name("iga")
            parents = client.search_runs([experiment.experiment_id], "tags.lifecycle = 'parent'")
            assert len(parents) == 2  # one per lifecycle run
            for parent in parents:
                children = client.search_runs([experiment.experiment_id],
                                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                assert sorted(c.data.tags["method"] for c in children) == ["erm", "iga"]
                assert all("ood_accuracy" in c.data.metrics and "lcs_penultimate" in c.data.metrics for c in children)
                assert "report/summary.md" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
            # the second run changed nothing: no new versions, the same champion
            versions = client.search_model_versions("name = 'iga-student'")
            assert len(versions) == 2
            champion = client.get_model_version_by_alias("iga-student", "champion")
            challenger = client.get_model_version_by_alias("iga-student", "challenger")
            assert {champion.version, challenger.version} == {v.version for v in versions}
            assert float(champion.tags["ood_accuracy"]) >= float(challenger.tags["ood_accuracy"])

            student = mlflow.pyfunc.load_model("models:/iga-student@champion")
            [completion] = student.predict(["Let x be 3. What is x?"])
            assert isinstance(completion, str) and completion
        finally:
            mlflow.set_tracking_uri(None)

        # What a param reaches, and nothing else (`dvc repro` in the repo the schedule ran)
        assert ran(sh(DVC + ["repro", "evaluate"], repo, env)) == []
        plots = sh(DVC + ["plots", "show", "--json"], repo, env)
        assert "plots/erm/accuracy.json" in plots and "plots/iga/lcs.json" in plots
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["gate"]["min_alignment"] = 0.6  # low enough to let some flawed instances through
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert sorted(ran(sh(DVC + ["repro", "evaluate"], repo, env))) == sorted(
            ["gate", "split", "select", "train@erm", "train@iga", "evaluate@erm", "evaluate@iga"])
        metrics = sh(DVC + ["metrics", "show", "--json"], repo, env)
        for key in ("kept_fraction", "seeds_in_both_sides", "loss_last_quarter", "ood_accuracy", "delta_gap"):
            assert key in metrics

        # What DVC would rerun next, from `dvc status` instead of running it: a params change reaches its stages
        # directly, and the stages after them through their outputs (train@iga's adapter feeds evaluate@iga).
        # A method's own settings retrain only that method; a new method adds only its own stages.
        tau, methods = params["methods"]["iga"]["tau"], params["train"]["methods"]
        params["methods"]["iga"]["tau"] = 1.0
        params["train"]["methods"] = ["erm", "iga", "iga-paper"]
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = sh(DVC + ["status", "evaluate", "--with-deps", "--json"], repo, env)
        assert set(json.loads(status)) == {"train@iga", "train@iga-paper", "evaluate@iga-paper"}
        # an evaluation setting re-evaluates every method without retraining any
        params["methods"]["iga"]["tau"], params["train"]["methods"] = tau, methods
        params["eval"]["lcs_groups"] = 3
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = sh(DVC + ["status", "evaluate", "--with-deps", "--json"], repo, env)
        assert set(json.loads(status)) == {"evaluate@erm", "evaluate@iga"}
