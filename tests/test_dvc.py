"""The lifecycle (`python -m flows.lifecycle`, i.e. `make demo`) in a temporary git repo (tiny student):
every stage runs, the report and registry appear; then `dvc repro` runs nothing, then only what a param reaches."""
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import copy_project, write_params


def _sh(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _ran(output):
    return re.findall(r"Running stage '([\w@-]+)'", output)


def test_dvc_repro(prefect_api_url, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    write_params(repo)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    dvc = [sys.executable, "-m", "dvc"]
    _sh(["git", "init", "-q"], repo, env)
    _sh(["git", "config", "user.name", "test"], repo, env)
    _sh(["git", "config", "user.email", "test@example.invalid"], repo, env)
    _sh(dvc + ["init", "-q"], repo, env)

    out = _sh([sys.executable, "-m", "flows.lifecycle"], repo, env)
    assert _ran(out) == ["seeds", "isomers", "gate", "split", "student", "select", "train@erm", "train@iga",
                         "evaluate@erm", "evaluate@iga"]
    assert "| Method |" in out and "models:/iga-student@champion" in out and "reports/summary.md" in out
    assert (repo / "dvc.lock").is_file() and (repo / "data/split/train.jsonl").is_file()
    assert (repo / "models/iga/adapter/adapter_model.safetensors").is_file()
    assert (repo / "reports/summary.md").is_file() and (repo / "models/erm/completions.jsonl").is_file()
    assert _ran(_sh(dvc + ["repro", "evaluate"], repo, env)) == []
    plots = _sh(dvc + ["plots", "show", "--json"], repo, env)
    assert "plots/erm/accuracy.json" in plots and "plots/iga/lcs.json" in plots

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gate"]["min_alignment"] = 0.6  # low enough to let some flawed instances through
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_sh(dvc + ["repro", "evaluate"], repo, env)) == ["gate", "split", "select", "train@erm", "train@iga",
                                                                 "evaluate@erm", "evaluate@iga"]
    metrics = _sh(dvc + ["metrics", "show", "--json"], repo, env)
    for key in ("kept_fraction", "seeds_in_both_sides", "loss_last_quarter", "ood_accuracy", "delta_gap"):
        assert key in metrics

    # a method's own settings retrain only that method; a new method trains only itself
    params["methods"]["iga"]["tau"] = 1.0
    params["train"]["methods"] = ["erm", "iga", "iga-paper"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_sh(dvc + ["repro", "evaluate"], repo, env)) == ["train@iga", "train@iga-paper", "evaluate@iga",
                                                     "evaluate@iga-paper"]
    # an evaluation setting re-evaluates without retraining
    params["eval"]["lcs_groups"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_sh(dvc + ["repro", "evaluate"], repo, env)) == ["evaluate@erm", "evaluate@iga", "evaluate@iga-paper"]
