"""The openai teacher at scale, against the fault-injecting server: faults, kill -9 and resume, the
budget, batch mode (with failed and missing lines, and a killed poller), rate limits, the dry run,
and an API key that must appear nowhere but on the wire."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_openai_teacher import MODEL, SENTINEL_KEY, hermetic_env, teacher_overrides  # noqa: F401 (autouse)

from conftest import ROOT, write_params
from fault_server import FAULTS, INSTANCE, VALID, FaultServer
from iga.data.teacher.ledger import totals
from iga.data.teacher.ratelimit import TokenBucket
from iga.io import read_jsonl

N_SEEDS = 12
CALLS_PER_SEED = 2 + 2 * 6  # extract, annotate, then instantiate + verify in each of 6 domains


def varied(name: str, body: dict[str, Any]) -> Any:
    """Answers that differ per request, so that no two seeds share a verify request."""
    tag = hashlib.sha256(body["messages"][1]["content"].encode()).hexdigest()[:8]
    return dict(INSTANCE, problem=f"{INSTANCE['problem']} [{tag}]") if name == "instantiate" else VALID[name]


@pytest.fixture
def server():
    with FaultServer() as srv:
        srv.state.responder = varied
        yield srv


def project(path: Path, server: FaultServer, **overrides: Any) -> Path:
    """A project folder with N_SEEDS JSONL seeds and params for the local server."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "seeds.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "problem": f"Tom has {i} apples and buys 4 more. How many?", "answer": i + 4})
        + "\n" for i in range(N_SEEDS)))
    write_params(path, {"seeds.source": "jsonl", "seeds.path": "seeds.jsonl", "teacher.chunk_size": 4,
                        **teacher_overrides(server.port, path / ".cache" / "teacher"), **overrides})
    return path


def seeded_project(path: Path, server: FaultServer, **overrides: Any) -> Path:
    """A project whose seeds stage has run (in this process: its Prefect server is already up)."""
    from flows.seeds import seeds_flow

    project(path, server, **overrides)
    cwd = os.getcwd()
    os.chdir(path)
    try:
        seeds_flow("params.yaml")
    finally:
        os.chdir(cwd)
    return path


def run(stage: str, path: Path, prefect_api_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"flows.{stage}"], cwd=path, env=env(prefect_api_url),
                          capture_output=True, text=True, timeout=300)


def cached_keys(path: Path) -> set[str]:
    return {p.stem for p in (path / ".cache" / "teacher").glob("??/*.json")}


def env(prefect_api_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api_url, "OPENAI_API_KEY": SENTINEL_KEY,
            "PYTHONPATH": str(ROOT), **extra}


def start(stage: str, cwd: Path, environ: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"flows.{stage}"], cwd=cwd, env=environ, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_20_percent_faults_lose_no_group_and_pay_no_key_twice(server, prefect_api_url, tmp_path, monkeypatch):
    """429 (with Retry-After), 500, hangs past the client's timeout (1 s: a slow but good answer must
    not time out and be paid twice), malformed and truncated bodies,
    drawn for 20 % of arrivals. Malformed and truncated answers are paid and rejected: the next try
    asks for a new sample, up to gate.max_attempts (3 here: two paid failures in a row of one call,
    p = 0.08^2, would otherwise cost a seed its DAG)."""
    from flows.data import data_flow

    server.state.fault_rate, server.state.hang_s, server.state.seed = 0.2, 2.0, 1
    monkeypatch.chdir(project(tmp_path, server, **{
        "teacher.openai.timeout_s": 1.0, "teacher.openai.max_retries": 6, "teacher.concurrency": 8,
        "gate.max_attempts": 3}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = data_flow("params.yaml")

    injected = server.state.injected
    assert set(injected) == set(FAULTS), injected  # every kind of fault happened
    assert sum(injected.values()) >= 0.15 * sum(server.state.arrivals.values())
    assert result["gate"]["groups_kept"] == N_SEEDS and result["gate"]["kept_fraction"] == 1.0
    assert max(server.state.paid.values()) == 1  # no cache key paid twice
    metrics = json.loads(Path("metrics/teacher.json").read_text())
    # An instance whose every try was rejected (rare) is neither verified in the isomers stage nor lost:
    # the gate regenerates it.
    failed = sum(r["error"] is not None for r in read_jsonl("data/isomers/instances.jsonl"))
    rejected = injected["malformed"] + injected["truncated"]
    assert metrics["isomers"]["paid_calls"] == N_SEEDS * CALLS_PER_SEED - 2 * failed + rejected
    assert metrics["gate"]["paid_calls"] >= 2 * failed
    assert metrics["total"]["rejected_answers"] == rejected
    assert metrics["total"]["retries"] == injected["429"] + injected["500"] + injected["timeout"]
    paid = sum(server.state.paid.values())
    print(f"faults injected {dict(injected)}; paid {paid} calls for {len(server.state.paid)} keys")

    data_flow("params.yaml")  # the same inputs again: all from the cache
    assert sum(server.state.paid.values()) == paid
    metrics = json.loads(Path("metrics/teacher.json").read_text())
    assert metrics["total"]["paid_calls"] == 0 and metrics["total"]["cache_hits"] == paid


def test_kill_9_mid_stage_then_rerun_repays_nothing_received(server, prefect_api_url, tmp_path):
    server.state.latency_s = 0.05
    path = seeded_project(tmp_path, server, **{"teacher.concurrency": 2})
    proc = start("isomers", path, env(prefect_api_url))
    wait_for(lambda: sum(server.state.paid.values()) >= 40 or proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()
    received = cached_keys(path)
    paid_before = sum(server.state.paid.values())
    assert 40 <= paid_before < N_SEEDS * CALLS_PER_SEED and received

    rerun = run("isomers", path, prefect_api_url)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    rows = read_jsonl(path / "data/isomers/instances.jsonl")
    assert len(rows) == N_SEEDS * 6 and all(r["error"] is None for r in rows)
    body_of = {}  # cache key -> the server's key for its body
    for key in received:
        entry = json.loads((path / ".cache/teacher" / key[:2] / f"{key}.json").read_text())
        body_of[key] = hashlib.sha256(json.dumps(entry["request"], sort_keys=True).encode()).hexdigest()
    repaid_received = [k for k in received if server.state.paid[body_of[k]] > 1]
    assert repaid_received == []  # 0 re-paid calls among the responses received before the kill
    in_flight = sum(server.state.paid.values()) - len(server.state.paid)  # answered as the process died
    assert in_flight <= 2  # at most the calls in flight (teacher.concurrency)
    ledger = totals(read_jsonl(path / "data/isomers/ledger.jsonl"))
    assert ledger["cache_hits"] >= len(received) - 2
    print(f"killed after {paid_before} paid calls ({len(received)} cached); the re-run paid "
          f"{ledger['paid_calls']}, re-paid {len(repaid_received)} received and {in_flight} in flight")


def test_budget_stops_the_stage_before_overspending(server, prefect_api_url, tmp_path):
    budget = 0.03  # a call costs $0.0002 (150 tokens at $1/$2 per Mtok); its worst case, reserved, ~$0.005-0.01
    path = seeded_project(tmp_path, server, **{"teacher.budget_usd": budget, "teacher.openai.max_tokens": 256,
                                               "teacher.concurrency": 4})
    stopped = run("isomers", path, prefect_api_url)
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert "error: teacher.budget_usd" in stopped.stderr and "re-run to continue without paying again" in stopped.stderr
    spent = totals(read_jsonl(path / "data/isomers/ledger.jsonl"))
    assert 0 < spent["cost_usd"] <= budget
    assert spent["paid_calls"] == sum(server.state.paid.values()) == len(cached_keys(path)) > 5
    assert not (path / "data/isomers/instances.jsonl").exists()  # no partial output

    project(path, server, **{"teacher.openai.max_tokens": 256})  # the same project without a budget
    done = run("isomers", path, prefect_api_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert max(server.state.paid.values()) == 1
    assert totals(read_jsonl(path / "data/isomers/ledger.jsonl"))["cache_hits"] == spent["paid_calls"]
    print(f"budget ${budget}: stopped after {spent['paid_calls']} calls, ${spent['cost_usd']:.4f}")


def test_batch_mode_end_to_end_with_failed_and_missing_lines(server, prefect_api_url, tmp_path, monkeypatch):
    from flows.data import data_flow

    server.state.batch_fail_rate, server.state.batch_missing_rate = 0.1, 0.1
    monkeypatch.chdir(project(tmp_path, server, **{"teacher.mode": "batch", "teacher.batch_poll_s": 0.01,
                                                   "teacher.openai.max_retries": 5}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = data_flow("params.yaml")
    assert result["gate"]["groups_kept"] == N_SEEDS
    assert max(server.state.paid.values()) == 1
    lines = [json.loads(x)["custom_id"] for b in server.state.batches.values()
             for x in server.state.files[b["input_file_id"]].decode().splitlines()]
    resent = len(lines) - len(set(lines))
    assert resent > 0  # failed and missing lines went back into later jobs
    ledger = read_jsonl("data/isomers/ledger.jsonl")
    assert {r["mode"] for r in ledger} == {"batch"} and [r["error"] for r in ledger if r["error"]] == []
    metrics = json.loads(Path("metrics/teacher.json").read_text())
    assert metrics["isomers"]["paid_calls"] == N_SEEDS * CALLS_PER_SEED
    assert metrics["total"]["cost_usd"] == pytest.approx(metrics["total"]["paid_calls"] * 0.5 * 200 / 1e6)
    print(f"batch: {len(server.state.batches)} jobs, {len(lines)} lines, {resent} resent")


def test_batch_job_survives_a_kill_and_is_polled_not_resubmitted(server, prefect_api_url, tmp_path):
    server.state.batch_polls = 10**9  # the first job never finishes while the first process lives
    path = seeded_project(tmp_path, server, **{"teacher.mode": "batch", "teacher.batch_poll_s": 0.01,
                                               "teacher.chunk_size": N_SEEDS})
    proc = start("isomers", path, env(prefect_api_url))
    jobs = path / ".cache/teacher/batches"
    wait_for(lambda: any(jobs.glob("*.json")) and server.state.batches.get("batch_1", {}).get("_polls", 0) > 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    polls = server.state.batches["batch_1"]["_polls"]
    server.state.batch_polls = polls + 1  # it finishes at the next poll
    rerun = run("isomers", path, prefect_api_url)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert server.state.batches["batch_1"]["_polls"] == polls + 1  # the re-run polled the old job ...
    lines = [json.loads(x)["custom_id"] for b in server.state.batches.values()
             for x in server.state.files[b["input_file_id"]].decode().splitlines()]
    assert len(lines) == len(set(lines)) == N_SEEDS * CALLS_PER_SEED  # ... and resubmitted nothing
    assert not any(jobs.glob("*.json"))  # finished jobs are forgotten


def test_retry_after_is_honoured_and_rpm_is_kept(server, tmp_path):
    from iga.data.teacher import make_teacher
    from iga.params import load_params

    def params(**extra):
        return load_params(ROOT / "params.yaml", overrides={
            "seeds.source": "jsonl", "seeds.path": "unused.jsonl", **teacher_overrides(server.port, tmp_path / "c"),
            "teacher.openai.max_retries": 2, **extra})

    server.state.fault_rate, server.state.faults, server.state.max_faults_per_key = 1.0, ("429",), 1
    server.state.retry_after_s = 0.4
    teacher = make_teacher(params())
    teacher.map(teacher.extraction, [{"seed_id": "s", "problem": "One?", "cot_solution": "Answer: 1"}])
    teacher.close()
    assert len(server.state.times) == 2 and server.state.times[1] - server.state.times[0] >= 0.4

    server.state.fault_rate, server.state.times = 0.0, []
    teacher = make_teacher(params(**{"teacher.rpm": 1200, "teacher.concurrency": 64}))  # 20/s, a burst of 20
    seeds = [{"seed_id": f"s{i}", "problem": f"{i}?", "cot_solution": "Answer: 1"} for i in range(50)]
    teacher.map(teacher.extraction, seeds)
    teacher.close()
    times = sorted(server.state.times)
    assert len(times) == 50
    assert all(sum(t <= x < t + 1.0 for x in times) <= 20 + 20 + 1 for t in times)  # rate x 1 s + burst
    assert times[-1] - times[0] >= (50 - 20) / 20 * 0.9


def test_the_engine_learns_a_hidden_limit_from_the_headers_and_keeps_under_it(server, tmp_path):
    """rpm and tpm unset; the server enforces 1200 requests per minute (20 per second, a bucket of 20) and
    says so in x-ratelimit-* headers: after its first answers the engine paces at PACE of it."""
    from fault_server import HiddenLimit
    from iga.data.teacher import make_teacher
    from iga.data.teacher.ratelimit import PACE
    from iga.params import load_params

    server.state.limit = HiddenLimit(rpm=1200, tpm=None)
    teacher = make_teacher(load_params(ROOT / "params.yaml", overrides={
        "seeds.source": "jsonl", "seeds.path": "unused.jsonl", **teacher_overrides(server.port, tmp_path / "c"),
        "teacher.openai.max_retries": 8, "teacher.concurrency": 64}))
    seeds = [{"seed_id": f"s{i}", "problem": f"{i}?", "cot_solution": "Answer: 1"} for i in range(120)]
    rows = teacher.map(teacher.extraction, seeds)
    teacher.close()
    assert all(r["error"] is None for r in rows)
    assert teacher.engine.learned == {"requests": 1200}
    attempts = sum(r["attempts"] for r in teacher.ledger())
    assert server.state.limit.limited == attempts - 120  # every retry was one of the limit's 429s
    # The first wave (64 calls at once, before any header came back) overran the bucket of 20; paced after it,
    # the rest saw few 429s.
    assert server.state.limit.limited <= 64 - 20 + 0.05 * 120
    times = sorted(server.state.times)
    assert (times[-1] - times[0]) >= (120 - 20 - 20) / (20 * PACE) * 0.9


def test_the_window_halves_on_a_429_once_per_round_and_grows_back():
    from iga.data.teacher.ratelimit import Window

    window = Window(16)
    window.cut(sent_at=0.0)
    assert window.size == 8
    window.cut(sent_at=0.0)  # sent before the cut: the same overload
    assert window.size == 8
    window.cut(sent_at=window.cut_at)
    assert window.size == 4
    for _ in range(4):  # a window's worth of answers adds about one call
        window.grow()
    assert 4.8 < window.size < 5
    for _ in range(1000):
        window.grow()
    assert window.size == 16
    for _ in range(10):
        window.cut(sent_at=window.cut_at)
    assert window.size == 1


def test_token_bucket_never_grants_more_than_rate_times_time_plus_burst(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("iga.data.teacher.ratelimit.time.monotonic", lambda: clock[0])
    bucket = TokenBucket(per_minute=600, burst=5)  # 10 units/s
    starts = []
    for i in range(40):
        clock[0] = i * 0.01  # requests arrive faster than the rate
        starts.append(clock[0] + bucket.reserve(1))
    starts.sort()
    assert starts[4] == pytest.approx(0.04) and starts[5] > 0.04  # the burst goes at once
    for i, t in enumerate(starts):
        assert i + 1 <= 10 * t + 5 + 1e-9  # granted by time t: at most rate * t + burst


def test_dry_run_estimates_calls_tokens_and_cost(server, prefect_api_url, tmp_path, monkeypatch):
    from flows.estimate import estimate_flow

    monkeypatch.chdir(seeded_project(tmp_path, server))
    est = estimate_flow("params.yaml")
    assert est["seeds"] == N_SEEDS and est["calls_expected"] == N_SEEDS * CALLS_PER_SEED
    assert est["calls_max"] == N_SEEDS * (2 * 2 + 12 * 4)  # 2 tries each; 2 attempts x 2 tries per instance call
    assert 0 < est["cost_usd_expected"] < est["cost_usd_max"]
    assert est["first_calls_cached"] == 0 and server.state.requests == []  # a dry run makes no call
    assert est["wall_time_expected"]["binding"] == "concurrency"  # rpm and tpm are unset here


def test_the_estimate_names_the_limit_that_binds():
    """The new user's case: tpm 200 000 counts prompt + max_tokens (2048) per call, ~2 600 tokens: ~77 calls
    a minute, whatever the concurrency; so 520 calls take ~6.8 min, bound by tpm."""
    from iga.data.teacher.estimate import wall_time

    wall = wall_time(calls=520, latency_s=520 * 6.0, limiter_tokens=520 * 2600, concurrency=16, rpm=500, tpm=200_000)
    assert wall["binding"] == "tpm" and wall["seconds"] == pytest.approx(60 * 520 * 2600 / 200_000, abs=0.1)
    assert wall["bounds_s"] == {"concurrency": 195.0, "rpm": 62.4, "tpm": 405.6}
    assert wall_time(520, 520 * 6.0, 520 * 2600, 16, None, None)["binding"] == "concurrency"


def test_the_api_key_reaches_no_log_no_mlflow_no_prefect_no_file(server, prefect_api_url, tmp_path):
    """`python -m flows.data` with faults, Prefect logs sent to the server, the openai client at DEBUG and
    MLflow on a local store: the sentinel key goes over the wire and nowhere else."""
    server.state.fault_rate = 0.2
    path = project(tmp_path / "project", server, **{"teacher.openai.timeout_s": 1.0, "teacher.openai.max_retries": 6,
                                                    "gate.max_attempts": 3})
    server.state.hang_s = 2.0
    mlflow_db = tmp_path / "mlflow.db"  # artifacts go to the project's mlruns/
    proc = subprocess.run([sys.executable, "-m", "flows.data"], cwd=path, capture_output=True, text=True, timeout=600,
                         env=env(prefect_api_url, PREFECT_LOGGING_TO_API_ENABLED="true", PREFECT_LOGGING_LEVEL="DEBUG",
                                 OPENAI_LOG="debug", MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db}"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(r["headers"]["authorization"] == f"Bearer {SENTINEL_KEY}" for r in server.state.requests)
    assert "HTTP Request: POST" in proc.stdout + proc.stderr  # the client did log its requests
    assert SENTINEL_KEY not in proc.stdout + proc.stderr
    from prefect.settings import get_current_settings

    prefect_db = Path(get_current_settings().server.database.connection_url.get_secret_value().split("///", 1)[1])
    stores = list(prefect_db.parent.glob(f"{prefect_db.name}*"))
    assert any(b"teacher: " in p.read_bytes() for p in stores)  # this run's logs reached the Prefect server
    assert list(path.glob("mlruns/**/ledger/*.jsonl")) and mlflow_db.is_file()  # and the ledger reached MLflow
    files = [p for p in [*path.rglob("*"), mlflow_db, *stores] if p.is_file()]
    leaks = [p for p in files if SENTINEL_KEY.encode() in p.read_bytes() or b"SENTINEL" in p.read_bytes()]
    assert leaks == []


def test_a_401_stops_the_stage_and_prefect_does_not_retry_it(server, prefect_api_url, tmp_path, monkeypatch):
    from flows.isomers import isomers_flow
    from iga.data.teacher.openai_teacher import OpenAITeacher
    from iga.errors import TeacherAbort

    monkeypatch.chdir(seeded_project(tmp_path, server, **{"teacher.task_retries": 2}))
    server.state.mode = "http401"
    chunk_runs = []
    original = OpenAITeacher.map
    monkeypatch.setattr(OpenAITeacher, "map", lambda self, fn, items: chunk_runs.append(1) or original(self, fn, items))
    with pytest.raises(TeacherAbort, match="HTTP 401 .* not retried"):
        isomers_flow("params.yaml")
    assert len(chunk_runs) == N_SEEDS // 4  # one run per chunk of 4 seeds: no Prefect retry
    assert len(server.state.requests) <= N_SEEDS  # at most the first wave, nothing after the stop
    assert Path("data/isomers/ledger.jsonl").is_file() and not Path("data/isomers/instances.jsonl").exists()


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The stage's error: exit status 2, no traceback anywhere, the error as the last line of stderr."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(last) == 1, proc.stderr[-3000:]
    return last[0]


def test_dvc_repro_split_fails_in_one_line_on_a_closed_port(server, prefect_api_url, tmp_path):
    """The new user's dead endpoint: `dvc repro split` stops at isomers with the endpoint and the error."""
    from conftest import copy_project

    repo = project(tmp_path / "repo", server)
    write_params(repo, {"seeds.source": "jsonl", "seeds.path": "seeds.jsonl", "teacher.chunk_size": 4,
                        **teacher_overrides(closed_port(), repo / ".cache" / "teacher"),
                        "teacher.openai.max_retries": 5, "teacher.openai.backoff_s": 1.0})
    copy_project(repo)
    environ = env(prefect_api_url, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(args, cwd=repo, env=environ, check=True, capture_output=True)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "split"], cwd=repo, env=environ, capture_output=True,
                          text=True, timeout=600)
    print(f"dvc repro split on a closed port: exit {proc.returncode} after {time.monotonic() - start:.1f} s")
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "error: cannot reach the teacher at http://127.0.0.1:" in proc.stderr
    assert "(teacher.openai.breaker)" in proc.stderr and "failed to reproduce 'isomers'" in proc.stderr
    assert not (repo / "data/isomers/instances.jsonl").exists()


def test_structurally_invalid_answers_fail_the_data_half_in_one_line(server, prefect_api_url, tmp_path):
    """Every extracted DAG has a cycle: each is a rejected try, then a failed extraction; nothing is left
    to instantiate, so the isomers stage fails instead of handing empty files on."""
    from test_openai_teacher import CYCLIC

    server.state.responder = lambda name, body: CYCLIC if name == "extract" else VALID[name]
    path = project(tmp_path, server)
    line = one_line_error(run("data", path, prefect_api_url))
    assert line.startswith(f"error: isomers: every teacher call failed ({N_SEEDS} DAGs, {N_SEEDS * 6} instances)")
    assert "extract: DAG of seed <id>: edges form a cycle (x" in line
    assert server.state.names().count("extract") == 2 * N_SEEDS  # both tries of every seed, then the stop
    assert read_jsonl(path / "data/isomers/dags.jsonl")  # written first: the files show what went wrong


def test_the_gate_regenerates_a_seed_whose_dag_failed(server, prefect_api_url, tmp_path, monkeypatch):
    """Seed s1's extraction is rejected twice (a cycle): its six instances have no DAG. The gate asks for
    the DAG again (attempt 2), instantiates the seed on it, and keeps every group."""
    from flows.data import data_flow

    seen = {"n": 0}

    def respond(name: str, body: dict[str, Any]) -> Any:
        from test_openai_teacher import CYCLIC

        if name == "extract" and "Tom has 1 apples" in body["messages"][1]["content"] and seen["n"] < 2:
            seen["n"] += 1
            return CYCLIC
        return varied(name, body)

    server.state.responder = respond
    monkeypatch.chdir(project(tmp_path, server))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = data_flow("params.yaml")
    assert [d["error"] is not None for d in read_jsonl("data/isomers/dags.jsonl")].count(True) == 1
    assert result["gate"]["kept_fraction"] == 1.0 and result["gate"]["extractions_regenerated"] == 1
    dags = {d["seed_id"]: d for d in read_jsonl("data/gate/dags.jsonl")}
    assert dags["s1"]["attempt"] == 2 and dags["s1"]["dag"] is not None and dags["s1"]["error"] is None
    assert {r["attempt"] for r in read_jsonl("data/gate/regenerated.jsonl")} == {2}
    assert len([r for r in read_jsonl("data/gate/accepted.jsonl") if r["seed_id"] == "s1"]) == 6


def test_the_window_never_lets_more_calls_in_than_its_size():
    """40 calls on a window of 8, the first cutting it to 4 as it starts: no call ever sees more than 4
    in flight, and every call gets its turn."""
    import asyncio

    from iga.data.teacher.ratelimit import Window

    async def scenario() -> list[int]:
        window, seen = Window(8), []

        async def call(i: int) -> None:
            async with window:
                if i == 0:
                    window.cut(sent_at=window.cut_at)
                seen.append(window.in_flight)
                await asyncio.sleep(0.005)

        await asyncio.gather(*(call(i) for i in range(40)))
        return seen

    seen = asyncio.run(scenario())
    assert len(seen) == 40 and max(seen) == 4
