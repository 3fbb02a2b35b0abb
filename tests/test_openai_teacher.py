"""The `openai` teacher against a real local HTTP server speaking the OpenAI API (tests/fault_server.py).

The server answers `POST /v1/chat/completions` with proper `chat.completion` bodies, picks what to
return from `response_format.json_schema.name`, and can be switched per test into failure modes (bad
JSON, schema mismatch, HTTP 400/401/404/500, truncation, hangs). Every request is recorded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fault_server import ANNOTATE, DAG, INSTANCE, VERIFY, FaultServer, schema_name
from iga.data.dag import LogicalDAG
from iga.data.teacher import make_teacher
from iga.data.teacher.openai_teacher import SCHEMAS, OpenAITeacher
from iga.errors import ConfigError, TeacherAbort
from iga.params import load_params, require_teacher_credentials

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"
SENTINEL_KEY = "sk-test-SENTINEL-12345"
MODEL = "test-model-iga"

SEED = {"seed_id": "s1", "problem": "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
        "answer": "7", "cot_solution": None, "program": None, "dag": None}


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL_KEY)
    for var in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# The openai teacher's settings for a local server: fast retries, no rate limits, a private cache.
def teacher_overrides(port: int, cache_dir: Path) -> dict[str, Any]:
    return {"teacher.provider": "openai", "teacher.openai.model": MODEL,
            "teacher.openai.base_url": f"http://127.0.0.1:{port}/v1", "teacher.openai.max_retries": 0,
            "teacher.openai.timeout_s": 5, "teacher.openai.backoff_s": 0.01, "teacher.rpm": None,
            "teacher.tpm": None, "teacher.cache_dir": str(cache_dir),
            "teacher.prices": {MODEL: {"input": 1.0, "output": 2.0}}}


def make_params(port: int, cache_dir: Path, **extra: Any):
    overrides = {"seeds.source": "jsonl", "seeds.path": "unused.jsonl", **teacher_overrides(port, cache_dir)}
    overrides.update(extra)
    return load_params(PARAMS_YAML, overrides=overrides)


@pytest.fixture
def params(server, tmp_path):
    return make_params(server.port, tmp_path / "cache")


@pytest.fixture
def teacher(params):
    t = make_teacher(params)
    yield t
    t.close()


def extract(teacher, seed=SEED) -> dict[str, Any]:
    return teacher.map(teacher.extraction, [seed])[0]


def isomer(teacher, ext, domain, attempt=1, seed=SEED) -> dict[str, Any]:
    return teacher.map(lambda _: teacher.isomer(seed, ext, domain, attempt), [None])[0]


def ok_extraction(teacher, server) -> dict[str, Any]:
    """A successful extraction (server in "ok" mode), then the request log is cleared."""
    mode, modes = server.state.mode, dict(server.state.modes)
    server.state.mode, server.state.modes = "ok", {}
    ext = extract(teacher)
    assert ext["error"] is None, ext
    server.state.mode, server.state.modes = mode, modes
    server.state.requests.clear()
    return ext


# ---------------------------------------------------------------------------------------- the tests


def test_valid_answers_full_round_trip(server, params, teacher):
    assert isinstance(teacher, OpenAITeacher)
    ext = extract(teacher)
    assert ext["error"] is None
    assert ext["seed_id"] == "s1"
    assert ext["dag"] == DAG
    LogicalDAG.from_dict(ext["dag"], "round trip")  # still a valid DAG
    assert ext["cot_solution"] == ANNOTATE["cot_solution"]  # annotated: the seed had no CoT
    assert server.state.names() == ["extract", "annotate"]

    row = isomer(teacher, ext, "medical")
    assert row["error"] is None
    assert row["problem"] == INSTANCE["problem"]
    assert row["cot_solution"] == INSTANCE["cot_solution"]
    assert row["answer"] == "7"
    assert row["alignment_score"] == pytest.approx(0.93)  # the verifier's score, not the self-score 0.9
    assert row["step_count"] == 1
    assert row["domain"] == "medical" and row["domain_kind"] == "train"
    assert row["teacher"] == "openai" and row["attempt"] == 1
    assert row["seed_id"] == "s1" and row["group_id"] == "g-s1"
    assert row["flaw"] is None
    assert server.state.names() == ["extract", "annotate", "instantiate", "verify"]

    for req in server.state.requests:
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["authorization"] == f"Bearer {SENTINEL_KEY}"
        body = req["body"]
        name = body["response_format"]["json_schema"]["name"]
        assert body["model"] == MODEL
        assert body["temperature"] == params.teacher.openai.temperature
        assert body["max_tokens"] == params.teacher.openai.max_tokens
        assert isinstance(body["seed"], int)
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["strict"] is True
        assert body["response_format"]["json_schema"]["schema"] == SCHEMAS[name]
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        user = body["messages"][1]["content"]
        assert "$" not in user  # every template variable substituted
        if name in ("extract", "annotate", "instantiate"):
            assert SEED["problem"] in user

    by_name = {r["body"]["response_format"]["json_schema"]["name"]: r["body"] for r in server.state.requests}
    inst_prompt = by_name["instantiate"]["messages"][1]["content"]
    assert '"medical"' in inst_prompt
    assert json.dumps(DAG) in inst_prompt
    verify_prompt = by_name["verify"]["messages"][1]["content"]
    assert "Instance domain: medical" in verify_prompt
    assert INSTANCE["problem"] in verify_prompt and INSTANCE["cot_solution"] in verify_prompt

    ledger = teacher.ledger()  # four paid calls, priced from teacher.prices (1 and 2 USD per Mtok)
    assert [r["kind"] for r in ledger] == ["extract", "annotate", "instantiate", "verify"]
    assert all(not r["cache_hit"] and r["prompt_tokens"] == 100 and r["completion_tokens"] == 50 for r in ledger)
    assert all(r["cost_usd"] == pytest.approx(200 / 1e6) and r["latency_s"] > 0 for r in ledger)


def test_rerun_answers_from_the_cache(server, params):
    first = make_teacher(params)
    ext = extract(first)
    isomer(first, ext, "legal")
    first.close()
    paid = sum(server.state.paid.values())
    again = make_teacher(params)  # a new process would see the same files
    assert extract(again) == ext and isomer(again, ext, "legal")["error"] is None
    again.close()
    assert sum(server.state.paid.values()) == paid == 4
    assert all(r["cache_hit"] and r["cost_usd"] == 0 and r["saved_usd"] > 0 for r in again.ledger())


def test_seed_with_cot_is_not_annotated_and_ood_domain(server, teacher):
    seed = dict(SEED, cot_solution="Step 1: 3 + 4 = 7\nAnswer: 7")
    ext = extract(teacher, seed)
    assert ext["error"] is None and ext["cot_solution"] == seed["cot_solution"]
    assert server.state.names() == ["extract"]
    row = isomer(teacher, ext, "finance", seed=seed)
    assert row["error"] is None and row["domain_kind"] == "ood"


def test_attempts_ask_for_different_samples_reruns_for_the_same(server, params, tmp_path):
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    isomer(teacher, ext, "legal", 1)
    isomer(teacher, ext, "legal", 2)
    teacher.close()
    fresh = make_teacher(make_params(server.port, tmp_path / "another-cache"))
    isomer(fresh, ext, "legal", 1)
    fresh.close()
    seeds = [r["body"]["seed"] for r in server.state.requests if r["body"]["response_format"]["json_schema"]["name"]
             == "instantiate"]
    assert len(seeds) == 3
    assert seeds[0] != seeds[1] and seeds[0] == seeds[2]


def test_bad_json_is_tried_again_then_becomes_error_row(server, teacher):
    ext = ok_extraction(teacher, server)
    server.state.mode = "bad_json"
    row = isomer(teacher, ext, "medical")
    assert row["error"] is not None and "invalid JSON" in row["error"]
    assert row["error"].startswith("instantiate:")
    assert row["problem"] is None and row["cot_solution"] is None and row["alignment_score"] is None
    assert row["step_count"] is None
    # gate.max_attempts (2) tries with different samples; no verify after a failed instantiate
    assert server.state.names() == ["instantiate", "instantiate"]
    seeds = {r["body"]["seed"] for r in server.state.requests}
    assert len(seeds) == 2
    assert all("invalid JSON" in r["error"] for r in teacher.ledger() if r["kind"] == "instantiate")


def test_a_rejected_answer_is_replaced_by_the_next_try(server, teacher):
    ext = ok_extraction(teacher, server)
    server.state.fail_first = {"instantiate": 1}
    row = isomer(teacher, ext, "medical")
    assert row["error"] is None and row["alignment_score"] == pytest.approx(0.93)
    assert server.state.names() == ["instantiate", "instantiate", "verify"]


CYCLIC = dict(DAG, edges=[*DAG["edges"], {"from": "q0", "to": "goal", "label": "REQUIRES"}])


def first_n(name: str, n: int, answer: Any):
    """A responder that gives `answer` to the first n requests of prompt `name`, valid answers otherwise."""
    from fault_server import VALID

    seen = {"n": 0}

    def respond(asked: str, body: dict[str, Any]) -> Any:
        if asked == name and seen["n"] < n:
            seen["n"] += 1
            return answer
        return VALID[asked]

    return respond


def test_an_unusable_dag_is_a_rejected_try_and_the_next_sample_is_taken(server, teacher):
    """A DAG that passes the JSON schema but has a cycle is rejected like bad JSON, with its reason."""
    server.state.responder = first_n("extract", 1, CYCLIC)
    ext = extract(teacher)
    assert ext["error"] is None and ext["dag"] == DAG
    assert server.state.names() == ["extract", "extract", "annotate"]
    rejected = [r for r in teacher.ledger() if r["error"]]
    assert len(rejected) == 1 and "edges form a cycle" in rejected[0]["error"]


def test_unusable_dags_fail_the_extraction_and_a_rerun_never_takes_one(server, params):
    server.state.responder = first_n("extract", 99, CYCLIC)
    teacher = make_teacher(params)
    ext = extract(teacher)
    teacher.close()
    assert ext["dag"] is None and ext["error"] == "extract: DAG of seed s1: edges form a cycle"
    assert server.state.names() == ["extract", "extract"]  # gate.max_attempts tries
    again = make_teacher(params)  # a re-run replays the cached tries: the same rejection, nothing paid
    assert extract(again)["error"] == ext["error"] and len(server.state.requests) == 2
    server.state.responder = None  # the gate's regeneration (attempt 2) asks for new samples
    assert again.map(lambda seed: again.extraction(seed, 2), [SEED])[0]["dag"] == DAG
    again.close()


def test_an_instance_without_a_readable_answer_is_a_rejected_try(server, teacher):
    ext = ok_extraction(teacher, server)
    server.state.responder = first_n("instantiate", 1, dict(INSTANCE, cot_solution="Step 1: 3 + 4 = 7"))
    row = isomer(teacher, ext, "medical")
    assert row["error"] is None and row["cot_solution"] == INSTANCE["cot_solution"]
    assert server.state.names() == ["instantiate", "instantiate", "verify"]


def test_the_ledger_times_the_whole_call_and_counts_its_attempts(server, tmp_path):
    """latency_s runs from the first attempt to the answer, the server's Retry-After wait included."""
    teacher = make_teacher(make_params(server.port, tmp_path, **{"teacher.openai.max_retries": 3}))
    server.state.fault_rate, server.state.faults, server.state.max_faults_per_key = 1.0, ("429",), 2
    server.state.retry_after_s = 0.25
    extract(teacher, dict(SEED, cot_solution="Step 1: 3 + 4 = 7\nAnswer: 7"))
    teacher.close()
    (row,) = teacher.ledger()
    assert row["attempts"] == 3 and row["error"] is None
    assert row["latency_s"] >= 2 * 0.25


def test_a_closed_port_trips_the_breaker_instead_of_retrying_every_call(tmp_path):
    """teacher.openai.breaker connection errors in a row stop the stage (here 4): without it, each of the
    12 calls would back off through its 5 retries and come back as an error row, and the stage go on."""
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = make_teacher(make_params(port, tmp_path, **{"teacher.openai.max_retries": 5,
                                                          "teacher.openai.backoff_s": 1.0,
                                                          "teacher.openai.breaker": 4}))
    seeds = [dict(SEED, seed_id=f"s{i}", problem=f"Problem {i}?") for i in range(12)]
    with pytest.raises(TeacherAbort, match=rf"cannot reach the teacher at http://127.0.0.1:{port}/v1: 4 connection "
                                           r"errors in a row \(teacher.openai.breaker\)"):
        teacher.map(teacher.extraction, seeds)
    teacher.close()


def test_bad_json_from_verifier_becomes_error_row(server, teacher):
    ext = ok_extraction(teacher, server)
    server.state.modes = {"verify": "bad_json"}
    row = isomer(teacher, ext, "medical")
    assert row["error"].startswith("verify:") and "invalid JSON" in row["error"]
    assert row["problem"] is None and row["alignment_score"] is None
    assert server.state.names() == ["instantiate", "verify", "verify"]


def test_schema_mismatch_becomes_error_row(server, teacher):
    ext = ok_extraction(teacher, server)
    server.state.mode = "schema_mismatch"
    row = isomer(teacher, ext, "medical")
    assert "schema" in row["error"]
    assert "cot_solution" in row["error"]  # names the missing field
    assert row["problem"] is None


def test_schema_mismatch_in_extract(server, teacher):
    server.state.mode = "schema_mismatch"
    ext = extract(teacher)
    assert ext["dag"] is None and ext["cot_solution"] is None
    assert ext["error"].startswith("extract:") and "schema" in ext["error"]


def test_http500_without_retries(server, teacher):
    ext = ok_extraction(teacher, server)
    server.state.mode = "http500"
    row = isomer(teacher, ext, "medical")
    assert "HTTP 500" in row["error"] and "after 1 tries" in row["error"]
    assert row["problem"] is None
    assert len(server.state.requests) == 1
    assert teacher.ledger()[-1]["error"] == row["error"]


def test_http500_is_retried(server, tmp_path):
    teacher = make_teacher(make_params(server.port, tmp_path, **{"teacher.openai.max_retries": 2}))
    ext = ok_extraction(teacher, server)
    server.state.mode = "http500"
    row = isomer(teacher, ext, "medical")
    teacher.close()
    assert "HTTP 500" in row["error"] and "after 3 tries" in row["error"]
    assert server.state.names() == ["instantiate"] * 3  # the first try and two retries
    assert teacher.ledger()[-1]["attempts"] == 3


@pytest.mark.parametrize("mode,status", [("http400", 400), ("http401", 401), ("http404", 404)])
def test_client_errors_stop_the_stage_without_retries(server, tmp_path, mode, status):
    teacher = make_teacher(make_params(server.port, tmp_path, **{"teacher.openai.max_retries": 3}))
    server.state.mode = mode
    with pytest.raises(TeacherAbort, match=f"HTTP {status} from http://127.0.0.1:{server.port}/v1 for model "
                                           f"'{MODEL}'.*not retried"):
        teacher.map(teacher.extraction, [SEED, dict(SEED, seed_id="s2", problem="Another problem?")])
    teacher.close()
    assert len(server.state.requests) <= 2  # one try per call in flight, then nothing more


def test_truncated_response_becomes_error_row(server, teacher):
    ext = ok_extraction(teacher, server)
    server.state.mode = "truncated"
    row = isomer(teacher, ext, "medical")
    assert "truncated" in row["error"]
    assert row["problem"] is None


def test_failed_extraction_gives_no_dag_isomer(server, teacher):
    server.state.modes = {"extract": "bad_json"}
    ext = extract(teacher)
    assert ext["dag"] is None and ext["cot_solution"] is None
    assert "invalid JSON" in ext["error"]
    assert server.state.names() == ["extract", "extract"]  # no annotation after a failed extraction
    row = isomer(teacher, ext, "medical")
    assert "no DAG" in row["error"]
    assert ext["error"] in row["error"]
    assert row["problem"] is None
    assert server.state.names() == ["extract", "extract"]  # the isomer made no request


def test_failed_annotation_fails_the_extraction(server, teacher):
    server.state.modes = {"annotate": "truncated"}
    ext = extract(teacher)
    assert ext["dag"] is None  # the row is all-or-nothing
    assert ext["error"].startswith("annotate:") and "truncated" in ext["error"]


def test_missing_key_is_a_config_error(server, params, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        make_teacher(params)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        require_teacher_credentials(params)
    monkeypatch.setenv("OPENAI_API_KEY", "")  # empty counts as missing
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        make_teacher(params)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        require_teacher_credentials(params)
    assert server.state.requests == []


def test_credentials_present_passes_the_check(server, params):
    require_teacher_credentials(params)  # does not raise
    assert server.state.requests == []


def test_key_never_leaks_into_rows_errors_or_logs(server, params, caplog):
    caplog.set_level(logging.DEBUG)
    teacher = make_teacher(params)
    rows: list[dict[str, Any]] = []
    ext = extract(teacher)
    rows += [ext, isomer(teacher, ext, "medical")]
    for i, mode in enumerate(("bad_json", "schema_mismatch", "http500", "truncated")):
        server.state.mode = mode
        failed = extract(teacher, dict(SEED, problem=f"{SEED['problem']} ({mode})"))
        rows += [failed, isomer(teacher, failed, "legal"), isomer(teacher, ext, "legal", attempt=2 + i)]
    server.state.mode = "http401"
    with pytest.raises(TeacherAbort) as abort:
        extract(teacher, dict(SEED, problem="A new problem?"))
    teacher.close()
    errors = [r["error"] for r in rows if r["error"]] + [str(abort.value)]
    assert len(errors) == 13  # every failure mode produced error rows, and 401 stopped the stage
    # The key did go over the wire (so its absence below means something) ...
    assert all(r["headers"]["authorization"] == f"Bearer {SENTINEL_KEY}" for r in server.state.requests)
    assert any(r.name.startswith("openai") for r in caplog.records)  # the client did log (at DEBUG)
    # ... but never into the rows, their errors, the ledger or the logs.
    assert SENTINEL_KEY not in json.dumps(rows) + json.dumps(teacher.ledger())
    assert not any(SENTINEL_KEY in e for e in errors)
    assert SENTINEL_KEY not in caplog.text
    assert "SENTINEL" not in caplog.text


def test_timeout_becomes_error_row(server, tmp_path):
    server.state.hang_s = 1.0
    teacher = make_teacher(make_params(server.port, tmp_path, **{"teacher.openai.timeout_s": 0.3}))
    ext = ok_extraction(teacher, server)
    server.state.mode = "slow"
    row = isomer(teacher, ext, "medical")
    teacher.close()
    assert "timed out after 0.3s" in row["error"]
    assert row["problem"] is None


def test_connection_refused_becomes_error_row(tmp_path):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = make_teacher(make_params(port, tmp_path))
    ext = extract(teacher)
    teacher.close()
    assert ext["dag"] is None and "connection error" in ext["error"]


@pytest.mark.parametrize("raw", ["<html>proxy error</html>", "{oops", "[]"], ids=["html", "broken", "array"])
def test_non_completion_200_body_becomes_error_row(server, teacher, raw):
    server.state.mode = "raw"
    server.state.raw_body = raw
    ext = extract(teacher)
    assert ext["dag"] is None and "not a chat completion" in ext["error"]


def fail_twice(item: str):
    """A responder whose first two instantiations of `item` (domain and seed problem) are bad JSON:
    both tries of attempt 1 fail, so the gate must regenerate the instance."""
    seen: dict[str, int] = {}

    def respond(name: str, body: dict[str, Any]) -> Any:
        from fault_server import VALID

        user = body["messages"][1]["content"]
        if name == "instantiate" and all(part in user for part in item):
            seen[item] = seen.get(item, 0) + 1
            if seen[item] <= 2:
                return "{not json"
        return VALID[name]

    return respond


def test_data_flow_with_openai_teacher(server, prefect_api_url, tmp_path, monkeypatch):
    """seeds (JSONL) -> isomers -> gate -> split through Prefect, the teacher being the local server:
    one instance fails both tries, is rejected by the gate, regenerated, and every group is kept."""
    from conftest import write_params
    from flows.data import data_flow
    from iga.io import read_jsonl

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "seeds.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "problem": f"Tom has {i} apples and buys 4 more. How many?", "answer": i + 4}) + "\n"
        for i in range(3)))
    write_params(tmp_path, {"seeds.source": "jsonl", "seeds.path": "seeds.jsonl",
                            **teacher_overrides(server.port, tmp_path / ".cache" / "teacher")})
    server.state.responder = fail_twice(('"legal"', "Tom has 1 apples"))
    result = data_flow("params.yaml")

    instances = read_jsonl("data/isomers/instances.jsonl")
    assert len(instances) == 3 * 6 and sum("invalid JSON" in (r["error"] or "") for r in instances) == 1
    rejects = read_jsonl("data/gate/rejects.jsonl")
    assert len(rejects) == 1 and all("teacher_error" in r["reason"] and not r["final"] for r in rejects)
    assert [r["attempt"] for r in read_jsonl("data/gate/regenerated.jsonl")] == [2]
    assert result["gate"]["kept_fraction"] == 1.0 and result["gate"]["regenerations"] == 1
    assert all(r["alignment_score"] == VERIFY["alignment_score"] for r in read_jsonl("data/gate/accepted.jsonl"))
    names = server.state.names()
    assert names.count("extract") == 3 and names.count("annotate") == 3 and names.count("instantiate") == 18 + 2
    metrics = json.loads((tmp_path / "metrics" / "teacher.json").read_text())
    # The server's instance is the same for every seed, so the verify requests of one domain are identical
    # across seeds: one request, one payment, per domain.
    assert metrics["isomers"]["paid_calls"] == 3 + 3 + 18 + 1 + 6
    assert metrics["gate"]["paid_calls"] == 1 and metrics["gate"]["cache_hits"] == 1  # its verify is cached
    assert max(server.state.paid.values()) == 1  # nothing paid twice
    assert metrics["total"]["cost_usd"] == pytest.approx(metrics["total"]["paid_calls"] * 200 / 1e6)
    assert metrics["isomers"]["rejected_answers"] == 2
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SENTINEL_KEY.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------- candidate CoTs and step validity


def _solve_per_sample(name: str, body: dict[str, Any]) -> Any:
    """A responder whose solve answers differ per sample (the request's sampling seed), so their verifications do too."""
    from fault_server import VALID

    if name == "solve":
        return {"cot_solution": f"Step 1: 3 + 4 = 7 (sample {body['seed']})\nAnswer: 7", "answer": "7"}
    return VALID[name]


def test_candidate_samples_are_distinct_calls_made_together_and_cached(server, params):
    k = 4
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    row = isomer(teacher, ext, "medical")
    dag = LogicalDAG.from_dict(ext["dag"], "extraction")
    server.state.requests.clear()
    server.state.responder = _solve_per_sample
    fetched, fetch = [], teacher.engine.fetch
    teacher.engine.fetch = lambda calls: (fetched.append([c.kind for c in calls]), fetch(calls))[1]
    paid_before = len([r for r in teacher.ledger() if not r["cache_hit"]])
    cands = teacher.map(lambda j: teacher.sample(SEED, row, j, dag), list(range(k)))
    teacher.close()

    assert cands[0] == {"sample": 0, "style": "sampled", "flaw": None, "cot_solution": row["cot_solution"],
                        "answer": row["answer"], "alignment_score": row["alignment_score"],
                        "step_count": row["step_count"], "error": None}
    assert [c["sample"] for c in cands] == list(range(k))
    assert all(c["error"] is None and c["style"] == "sampled" and c["answer"] == "7" and c["step_count"] == 1
               and c["alignment_score"] == pytest.approx(VERIFY["alignment_score"]) for c in cands[1:])
    assert len({c["cot_solution"] for c in cands}) == k  # the row's own and k - 1 new samples
    assert fetched == [["solve"] * (k - 1), ["verify"] * (k - 1)]  # each round's calls fetched together
    solve_bodies = [r["body"] for r in server.state.requests if schema_name(r["body"]) == "solve"]
    assert len(solve_bodies) == k - 1 and len({b["seed"] for b in solve_bodies}) == k - 1
    assert row["problem"] in solve_bodies[0]["messages"][1]["content"]
    paid = [r for r in teacher.ledger() if not r["cache_hit"]][paid_before:]
    assert sorted(r["kind"] for r in paid) == ["solve"] * (k - 1) + ["verify"] * (k - 1)
    assert len({r["key"] for r in paid}) == 2 * (k - 1)

    again = make_teacher(params)  # a re-run: every candidate from the cache, nothing paid
    n_paid = sum(server.state.paid.values())
    assert again.map(lambda j: again.sample(SEED, row, j, dag), list(range(k))) == cands
    again.close()
    assert sum(server.state.paid.values()) == n_paid
    assert again.ledger() and all(r["cache_hit"] for r in again.ledger())


def test_a_failed_candidate_is_an_error_not_a_crash(server, teacher):
    ext = ok_extraction(teacher, server)
    row = isomer(teacher, ext, "legal")
    server.state.modes = {"solve": "bad_json"}
    c = teacher.map(lambda j: teacher.sample(SEED, row, j, LogicalDAG.from_dict(ext["dag"], "x")), [1])[0]
    assert c["sample"] == 1 and c["cot_solution"] is None and "invalid JSON" in c["error"]
    c = teacher.map(lambda j: teacher.sample(SEED, row, j), [2])[0]  # this seed has no DAG of its own
    assert "no DAG" in c["error"]


def test_verify_step_returns_the_servers_validity_per_line(server, teacher):
    def respond(name: str, body: dict[str, Any]) -> Any:
        user = body["messages"][1]["content"]
        return {"validity": 0.0 if "= 8" in user.split("Proposed next line:")[1] else 0.75, "reason": "checked"}

    server.state.responder = respond
    row = {"problem": INSTANCE["problem"], "domain": "medical"}
    good, bad = "Step 1: 3 + 4 = 7 mg.", "Step 1: 3 + 4 = 8 mg."
    assert teacher.map(lambda line: teacher.verify_step(SEED, row, [], line), [bad, good]) == [0.0, 0.75]
    assert teacher.map(lambda line: teacher.verify_step(SEED, row, [good], line), ["Answer: 7"]) == [0.75]
    asked = [r["body"]["messages"][1]["content"] for r in server.state.requests]
    assert server.state.names() == ["verify_step"] * 3
    assert all(INSTANCE["problem"] in a for a in asked) and good in asked[2] and "Answer: 7" in asked[2]
    assert teacher.verify_step(SEED, row, [], bad) == 0.0  # from the cache: no Pending outside map
    assert len(server.state.requests) == 3
    ledger = teacher.ledger()  # one record per cache key: a line and its prefix make the key
    assert len(ledger) == 3 and all(r["kind"] == "verify_step" and not r["cache_hit"] for r in ledger)
