"""The lifecycle survives kills and overlaps (tiny student, a git + DVC repo, MLflow on sqlite).

`python -m flows.lifecycle` is killed (SIGKILL to its whole process group, as a crashed machine or an
OOM killer would) in the teacher, the gate, training, evaluation and registration, re-run after each
kill, and ends in the metrics, registered versions and champion of an uninterrupted run in another
repo; no file is left half-written. A second lifecycle started while one goes stops at once, in one line
(the scheduled deployment instead queues it: flows/lifecycle.py serve, global_limit 1).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import copy_project, write_params
from iga.io import TMP_SUFFIX, leftover_temporaries

# (a line of the lifecycle's output to wait for, the phase it is in): each kill lands in its phase.
KILLS = [("for flow 'isomers'", "teacher"),
         ("for flow 'gate'", "gate"),
         ("erm step 1/", "training"),
         ("for flow 'evaluate'", "evaluation"),
         ("registered iga-student version", "registration")]


def make_repo(path: Path, env: dict[str, str]) -> Path:
    path.mkdir()
    copy_project(path)
    write_params(path)
    for args in (["git", "init", "-q"], ["git", "config", "user.name", "test"],
                 ["git", "config", "user.email", "test@example.invalid"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(args, cwd=path, env=env, check=True, capture_output=True)
    return path


def environ(repo: Path, prefect_api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api_url, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


class Lifecycle:
    """`python -m flows.lifecycle` in its own process group; its output read line by line."""

    def __init__(self, repo: Path, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.lifecycle"], cwd=repo, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self.seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.seen:
                self.lines.append(line)
                self.seen.notify_all()
        with self.seen:
            self.seen.notify_all()

    def wait_for(self, text: str, timeout: float = 600) -> None:
        with self.seen:
            found = self.seen.wait_for(lambda: any(text in x for x in self.lines) or self.proc.poll() is not None,
                                       timeout)
        assert found and any(text in x for x in self.lines), f"never saw {text!r}:\n" + "".join(self.lines[-60:])

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 900) -> str:
        assert self.proc.wait(timeout) == 0, "".join(self.lines[-80:])
        return "".join(self.lines)


def no_half_written_file(repo: Path) -> None:
    """Every JSON and JSONL output parses; interrupted writes are only ever temporary siblings."""
    for d in ("data", "metrics", "models", "reports", "plots"):
        for path in (repo / d).rglob("*"):
            in_temporary = any(part.endswith(TMP_SUFFIX) for part in path.relative_to(repo).parts)
            if path.is_file() and path.suffix in (".json", ".jsonl") and not in_temporary:
                text = path.read_text()
                if path.suffix == ".json":
                    json.loads(text)
                else:
                    [json.loads(line) for line in text.splitlines() if line.strip()]


def weights(adapter: Path) -> str:
    """A digest of the adapter's tensors (its config names the repo's own base path, which differs)."""
    from safetensors.torch import load_file

    h = hashlib.md5()
    for name, tensor in sorted(load_file(adapter / "adapter_model.safetensors").items()):
        h.update(name.encode() + tensor.numpy().tobytes())
    return h.hexdigest()


def outcome(repo: Path) -> dict:
    """What a lifecycle run ends in: metrics, adapter weights, registered versions, champion, open runs."""
    import mlflow

    from tasks.registry import _adapter_md5

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'iga-student'")
    champion = client.get_model_version_by_alias("iga-student", "champion")
    running = client.search_runs([client.get_experiment_by_name("iga").experiment_id],
                                 "tags.lifecycle = 'parent' and attributes.status = 'RUNNING'")
    return {
        "metrics": {f.relative_to(repo).as_posix(): json.loads(f.read_text())
                    for f in sorted((repo / "metrics" / "eval").glob("*.json"))},
        "weights": {m: weights(repo / f"models/{m}/adapter") for m in ("erm", "iga")},
        # each method registered once, as the adapter on disk
        "versions": sorted((v.tags["method"], v.tags["adapter_md5"] == _adapter_md5(repo / "models" / v.tags["method"]
                                                                                    / "adapter")) for v in versions),
        "champion": champion.tags["method"],
        "running_parents": len(running),
    }


@pytest.mark.slow  # ~4 min 20 s on 2 AVX2 cores: a reference lifecycle and five killed ones (make test-all)
def test_kill_9_at_every_phase_then_rerun_ends_as_an_uninterrupted_run(prefect_api_url, tmp_path):
    reference = make_repo(tmp_path / "reference", {**os.environ})
    Lifecycle(reference, environ(reference, prefect_api_url)).finish()

    repo = make_repo(tmp_path / "killed", {**os.environ})
    env = environ(repo, prefect_api_url)
    for text, phase in KILLS:
        run = Lifecycle(repo, env)
        run.wait_for(text)
        run.kill()
        print(f"killed in {phase} (after {text!r})")
        no_half_written_file(repo)
    last = Lifecycle(repo, env)
    last.wait_for("clean_up_after_kills")  # it holds the lock; paused there, so that it still does when
    os.killpg(last.proc.pid, signal.SIGSTOP)  # a second run (a scheduled one firing) starts
    try:
        second = subprocess.run([sys.executable, "-m", "flows.lifecycle"], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=300)
    finally:
        os.killpg(last.proc.pid, signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in second.stdout + second.stderr, second.stderr[-3000:]
    assert f"error: a lifecycle run is already in progress here (pid {last.proc.pid}, since " in second.stderr
    last.finish()

    no_half_written_file(repo)
    assert not [p for d in ("data", "models", "metrics") for p in leftover_temporaries(repo / d)]
    got, want = outcome(repo), outcome(reference)
    for key in want:
        assert got[key] == want[key], key
    assert got["versions"] == [("erm", True), ("iga", True)] and got["running_parents"] == 0


@pytest.mark.parametrize("holder_alive", [True, False])
def test_the_lifecycle_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path, holder_alive):
    """flock: a live holder refuses others with its pid; a killed holder leaves no stale lock."""
    from iga.errors import Busy
    from iga.io import exclusive

    lock = tmp_path / "lifecycle.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from iga.io import exclusive\nwith exclusive(sys.argv[2], 'x'):\n"
                               " print('held', flush=True); time.sleep(60)", str(Path(__file__).parents[1]), str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        if holder_alive:
            with pytest.raises(Busy, match=rf"a lifecycle run is already in progress here \(pid {holder.pid}, since "):
                with exclusive(lock, "a lifecycle run"):
                    pass
        else:
            holder.kill()
            holder.wait()
            with exclusive(lock, "a lifecycle run"):
                assert f"pid {os.getpid()}" in lock.read_text()
    finally:
        holder.kill()
        holder.wait()
