"""Hermetic test settings: every tool gets a temporary home and no telemetry, set before any import."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="iga-tests-"))
os.environ.update({
    "PREFECT_HOME": str(_HOME / "prefect"),
    "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{_HOME / 'prefect' / 'prefect.db'}",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MPLCONFIGDIR": str(_HOME / "mpl"),
    "HF_HOME": str(_HOME / "hf"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "DVC_SITE_CACHE_DIR": str(_HOME / "dvc-site"),
    "DVC_GLOBAL_CONFIG_DIR": str(_HOME / "dvc-global"),
    "DVC_SYSTEM_CONFIG_DIR": str(_HOME / "dvc-system"),
    "GX_ANALYTICS_ENABLED": "false",
    "GIT_CONFIG_GLOBAL": str(_HOME / "gitconfig"),
})
for var in ("PREFECT_API_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "MLFLOW_S3_ENDPOINT_URL",
            *(v for v in os.environ if v.startswith("AWS_"))):
    os.environ.pop(var, None)
# No developer's ~/.aws and no instance-metadata probe: S3 clients see only what a test gives them.
os.environ.update({"AWS_CONFIG_FILE": str(_HOME / "aws" / "config"),
                   "AWS_SHARED_CREDENTIALS_FILE": str(_HOME / "aws" / "credentials"),
                   "AWS_EC2_METADATA_DISABLED": "true"})

# Small enough for seconds, large enough that every family, flaw and gate shows up; a tiny student.
TINY = {"seeds.n": 30, "teacher.chunk_size": 8, "student.base": "tiny", "train.steps": 4,
        "train.max_length": 1024, "train.checkpoint_every": 2, "eval.max_new_tokens": 16,
        "eval.external": {"gsm8k": {"limit": 2}, "math_id": {"limit": 2}, "math_ood": {"limit": 2}}}


def write_params(directory: Path, overrides: dict | None = None) -> Path:
    """params.yaml from the project's, with dotted-key overrides, written into `directory`."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in {**TINY, **(overrides or {})}.items():
        node = data
        *parents, last = dotted.split(".")
        for k in parents:
            node = node[k]
        assert last in node, dotted
        node[last] = value
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# `make test` runs each file whole on one of two workers, taking the next file in collection order as one
# finishes; these files start first, longest first (seconds of the whole file beside the other worker, bfb0f4b's
# tests on Zen 4), so that no long file starts last and leaves the other worker idle. The rest keep pytest's order.
LONGEST_FIRST = ("test_lifecycle.py",     # 276: the scheduled lifecycle and `dvc repro` in its repo
                 "test_experiment.py",    # 210: the tiny matrix killed and resumed in another clone
                 "test_distributed.py",   # 155: 2-rank training against one process, every method
                 "test_teacher_scale.py",  # 145: the openai teacher against the fault server
                 "test_train_flow.py",    # 140: a killed training resumed; the flow on 2 ranks
                 "test_registry.py",      # 90: the null-promotion simulation and a real registry
                 "test_ray.py",           # 85: a Ray head and the matrix's pairs on it
                 "test_student.py")       # 45: SmolLM2 converted from its GGUF file


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: a file's tests stay in order


@pytest.fixture(scope="session")
def prefect_api_url():
    """One real Prefect server for the whole session; its URL lets subprocesses skip a 15 s start-up."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch project directory with tiny params; the flows read and write relative to it."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer trained offline (iga.train.student.build_tiny), as a base-model folder."""
    from iga.train.student import prepare_base

    path = tmp_path_factory.mktemp("tiny-base")
    prepare_base("tiny", path)
    return path


def isomer_rows(n_seeds: int, seed: int = 0) -> list[dict]:
    """Clean isomer rows (procedural teacher, no flaws) for `n_seeds` seeds in the training domains."""
    from iga.data.seeds import procedural_seeds
    from iga.data.teacher import make_teacher
    from iga.params import load_params

    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": n_seeds, "seeds.seed": seed,
                                                          "teacher.flaw_rate": 0.0})
    teacher = make_teacher(params)
    return [teacher.isomer(s, teacher.extraction(s), d, 1) for s in procedural_seeds(params.seeds)
            for d in params.domains.train]


def random_adapter(method: str, seed: int) -> None:
    """An untrained LoRA adapter on models/base, saved where training saves `method`'s; its B matrices
    are random (LoRA starts them at zero), so versions from different seeds really differ."""
    import torch

    from iga.params import load_params
    from iga.train.student import load_student
    from tasks.paths import adapter_dir

    params = load_params("params.yaml")
    model, tokenizer = load_student("models/base", params.lora, seed=seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(adapter_dir(method))
    tokenizer.save_pretrained(adapter_dir(method))


def copy_project(dest: Path) -> None:
    for name in ("iga", "tasks", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    (dest / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "pairs.yaml", dest / "experiments" / "pairs.yaml")  # dvc.yaml's vars


DVC = [sys.executable, "-m", "dvc"]


def sh(args: list, cwd: Path, env: dict) -> str:
    """`args` run in `cwd`; fails the test with its output unless it exits 0; returns stdout and stderr."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in its order, from its output."""
    return re.findall(r"Running stage '([\w@.-]+)'", output)
