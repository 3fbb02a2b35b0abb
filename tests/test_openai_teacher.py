"""The `openai` teacher against a real local HTTP server speaking the OpenAI chat-completions API.

The server (http.server in a background thread, 127.0.0.1 only) answers `POST /v1/chat/completions`
with proper `chat.completion` bodies, picks what to return from `response_format.json_schema.name`,
and can be switched per test into failure modes (bad JSON, schema mismatch, HTTP 500/401,
truncation). Every request it receives is recorded for assertions.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from iga.dag import LogicalDAG
from iga.errors import ConfigError
from iga.params import load_params, require_teacher_credentials
from iga.teacher import make_teacher
from iga.teacher.openai_teacher import SCHEMAS, OpenAITeacher

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"
SENTINEL_KEY = "sk-test-SENTINEL-12345"
MODEL = "test-model-iga"

SEED = {"seed_id": "s1", "problem": "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
        "answer": "7", "cot_solution": None, "program": None, "dag": None}

DAG = {
    "nodes": [
        {"id": "q0", "type": "ENTITY", "description": "an initial quantity"},
        {"id": "q1", "type": "PROPOSITION", "description": "the quantity after an addition"},
        {"id": "goal", "type": "GOAL", "description": "the final quantity"},
    ],
    "edges": [
        {"from": "q1", "to": "q0", "label": "REQUIRES"},
        {"from": "goal", "to": "q1", "label": "REQUIRES"},
    ],
    "logical_form": "goal = q0 + a",
    "step_count": 1,
}
INSTANCE = {"problem": "A patient takes 3 mg of a drug and then 4 mg more. What is the total dose in mg?",
            "cot_solution": "Step 1: 3 + 4 = 7\nAnswer: 7", "answer": "7", "alignment_score": 0.9}
VERIFY = {"alignment_score": 0.93, "verdict": "PASS", "issues": ""}
ANNOTATE = {"cot_solution": "Step 1: 3 + 4 = 7\nAnswer: 7", "answer": "7"}
VALID = {"extract": DAG, "instantiate": INSTANCE, "verify": VERIFY, "annotate": ANNOTATE}
# Valid JSON, but each misses required fields of its schema.
MISMATCH = {"extract": {"nodes": []}, "instantiate": {"problem": "only a problem"},
            "verify": {"alignment_score": 0.5}, "annotate": {"answer": "7"}}


# --------------------------------------------------------------------------------------- the server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FakeOpenAIServer"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
        pass

    def _send(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", f"req_{len(self.server.requests)}")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = None
        srv = self.server
        with srv.lock:
            srv.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                 "body": body})
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"Unknown path {self.path}", "type": "invalid_request_error",
                                       "param": None, "code": None}})
            return
        name = ((body or {}).get("response_format") or {}).get("json_schema", {}).get("name")
        mode = srv.modes.get(name, srv.mode)
        with srv.lock:
            if srv.fail_first.get(name):  # the first N calls of this kind answer bad JSON
                srv.fail_first[name] -= 1
                mode = "bad_json"
        if mode == "http500":
            self._send(500, {"error": {"message": "The server had an error while processing your request.",
                                       "type": "server_error", "param": None, "code": None}},
                       {"retry-after-ms": "5"})  # keep client retries fast
            return
        if mode == "http401":
            self._send(401, {"error": {"message": "Incorrect API key provided: sk-test-*************2345.",
                                       "type": "invalid_request_error", "param": None,
                                       "code": "invalid_api_key"}})
            return
        if mode == "raw":  # a 200 that is not a chat.completion (a proxy's page, a broken body)
            raw = srv.raw_body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        if mode == "slow":  # answers after the client's timeout
            time.sleep(1.0)
            mode = "ok"
        finish_reason = "stop"
        if mode == "ok":
            content = json.dumps(VALID[name])
        elif mode == "bad_json":
            content = "{not json"
        elif mode == "schema_mismatch":
            content = json.dumps(MISMATCH[name])
        elif mode == "truncated":
            content = json.dumps(VALID[name])[:20]
            finish_reason = "length"
        else:  # pragma: no cover - a typo in a test
            raise AssertionError(f"unknown mode {mode!r}")
        self._send(200, {
            "id": f"chatcmpl-{len(srv.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
        })


class FakeOpenAIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.mode = "ok"  # default behaviour
        self.modes: dict[str, str] = {}  # per schema name, overrides `mode`
        self.raw_body = ""  # the body of mode "raw"
        self.fail_first: dict[str, int] = {}  # schema name -> how many first calls fail

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up first (the timeout test): expected
        super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def names(self) -> list[str]:
        return [r["body"]["response_format"]["json_schema"]["name"] for r in self.requests]


@pytest.fixture
def server():
    srv = FakeOpenAIServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL_KEY)
    for var in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def make_params(port: int, **extra: Any):
    overrides = {
        "seeds.source": "jsonl", "seeds.path": "unused.jsonl",
        "teacher.provider": "openai",
        "teacher.openai.model": MODEL,
        "teacher.openai.base_url": f"http://127.0.0.1:{port}/v1",
        "teacher.openai.max_retries": 0,
        "teacher.openai.timeout_s": 5,
    }
    overrides.update(extra)
    return load_params(PARAMS_YAML, overrides=overrides)


@pytest.fixture
def params(server):
    return make_params(server.port)


def ok_extraction(teacher, server) -> dict[str, Any]:
    """A successful extraction (server in "ok" mode), then the request log is cleared."""
    mode, modes = server.mode, dict(server.modes)
    server.mode, server.modes = "ok", {}
    ext = teacher.extraction(SEED)
    assert ext["error"] is None, ext
    server.mode, server.modes = mode, modes
    server.requests.clear()
    return ext


# ---------------------------------------------------------------------------------------- the tests


def test_valid_answers_full_round_trip(server, params):
    teacher = make_teacher(params)
    assert isinstance(teacher, OpenAITeacher)

    ext = teacher.extraction(SEED)
    assert ext["error"] is None
    assert ext["seed_id"] == "s1"
    assert ext["dag"] == DAG
    LogicalDAG.from_dict(ext["dag"], "round trip")  # still a valid DAG
    assert ext["cot_solution"] == ANNOTATE["cot_solution"]  # annotated: the seed had no CoT
    assert server.names() == ["extract", "annotate"]

    row = teacher.isomer(SEED, ext, "medical", 1)
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
    assert server.names() == ["extract", "annotate", "instantiate", "verify"]

    for req in server.requests:
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

    by_name = {r["body"]["response_format"]["json_schema"]["name"]: r["body"] for r in server.requests}
    inst_prompt = by_name["instantiate"]["messages"][1]["content"]
    assert '"medical"' in inst_prompt
    assert json.dumps(DAG) in inst_prompt
    verify_prompt = by_name["verify"]["messages"][1]["content"]
    assert "Instance domain: medical" in verify_prompt
    assert INSTANCE["problem"] in verify_prompt and INSTANCE["cot_solution"] in verify_prompt


def test_seed_with_cot_is_not_annotated_and_ood_domain(server, params):
    teacher = make_teacher(params)
    seed = dict(SEED, cot_solution="Step 1: 3 + 4 = 7\nAnswer: 7")
    ext = teacher.extraction(seed)
    assert ext["error"] is None and ext["cot_solution"] == seed["cot_solution"]
    assert server.names() == ["extract"]
    row = teacher.isomer(seed, ext, "finance", 1)
    assert row["error"] is None and row["domain_kind"] == "ood"


def test_attempts_ask_for_different_samples_reruns_for_the_same(server, params):
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    teacher.isomer(SEED, ext, "legal", 1)
    teacher.isomer(SEED, ext, "legal", 2)
    teacher.isomer(SEED, ext, "legal", 1)
    seeds = [r["body"]["seed"] for r in server.requests if r["body"]["response_format"]["json_schema"]["name"]
             == "instantiate"]
    assert len(seeds) == 3
    assert seeds[0] != seeds[1] and seeds[0] == seeds[2]


def test_bad_json_becomes_error_row(server, params):
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    server.mode = "bad_json"
    row = teacher.isomer(SEED, ext, "medical", 1)
    assert row["error"] is not None and "invalid JSON" in row["error"]
    assert row["error"].startswith("instantiate:")
    assert row["problem"] is None and row["cot_solution"] is None and row["alignment_score"] is None
    assert row["step_count"] is None
    assert server.names() == ["instantiate"]  # no verify after a failed instantiate


def test_bad_json_from_verifier_becomes_error_row(server, params):
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    server.modes = {"verify": "bad_json"}
    row = teacher.isomer(SEED, ext, "medical", 1)
    assert row["error"].startswith("verify:") and "invalid JSON" in row["error"]
    assert row["problem"] is None and row["alignment_score"] is None
    assert server.names() == ["instantiate", "verify"]


def test_schema_mismatch_becomes_error_row(server, params):
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    server.mode = "schema_mismatch"
    row = teacher.isomer(SEED, ext, "medical", 1)
    assert "schema" in row["error"]
    assert "cot_solution" in row["error"]  # names the missing field
    assert row["problem"] is None


def test_schema_mismatch_in_extract(server, params):
    teacher = make_teacher(params)
    server.mode = "schema_mismatch"
    ext = teacher.extraction(SEED)
    assert ext["dag"] is None and ext["cot_solution"] is None
    assert ext["error"].startswith("extract:") and "schema" in ext["error"]


def test_http500_without_retries(server, params):
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    server.mode = "http500"
    t0 = time.monotonic()
    row = teacher.isomer(SEED, ext, "medical", 1)
    assert "HTTP 500" in row["error"]
    assert row["problem"] is None
    assert len(server.requests) == 1
    assert time.monotonic() - t0 < 2


def test_http500_is_retried_by_the_client(server):
    params = make_params(server.port, **{"teacher.openai.max_retries": 2})
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    server.mode = "http500"
    row = teacher.isomer(SEED, ext, "medical", 1)
    assert "HTTP 500" in row["error"]
    assert len(server.requests) == 3  # the first try and two retries
    assert server.names() == ["instantiate"] * 3


def test_http401_is_not_retried(server):
    params = make_params(server.port, **{"teacher.openai.max_retries": 2})
    teacher = make_teacher(params)
    server.mode = "http401"
    ext = teacher.extraction(SEED)
    assert "HTTP 401" in ext["error"] and ext["dag"] is None
    assert len(server.requests) == 1


def test_truncated_response_becomes_error_row(server, params):
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    server.mode = "truncated"
    row = teacher.isomer(SEED, ext, "medical", 1)
    assert "truncated" in row["error"]
    assert row["problem"] is None


def test_failed_extraction_gives_no_dag_isomer(server, params):
    teacher = make_teacher(params)
    server.modes = {"extract": "bad_json"}
    ext = teacher.extraction(SEED)
    assert ext["dag"] is None and ext["cot_solution"] is None
    assert "invalid JSON" in ext["error"]
    assert server.names() == ["extract"]  # no annotation after a failed extraction
    row = teacher.isomer(SEED, ext, "medical", 1)
    assert "no DAG" in row["error"]
    assert ext["error"] in row["error"]
    assert row["problem"] is None
    assert server.names() == ["extract"]  # the isomer made no request


def test_failed_annotation_fails_the_extraction(server, params):
    teacher = make_teacher(params)
    server.modes = {"annotate": "truncated"}
    ext = teacher.extraction(SEED)
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
    assert server.requests == []


def test_credentials_present_passes_the_check(server, params):
    require_teacher_credentials(params)  # does not raise
    assert server.requests == []


def test_key_never_leaks_into_rows_errors_or_logs(server, params, caplog):
    caplog.set_level(logging.DEBUG)
    teacher = make_teacher(params)
    rows: list[dict[str, Any]] = []
    ext = teacher.extraction(SEED)
    rows += [ext, teacher.isomer(SEED, ext, "medical", 1)]
    for mode in ("bad_json", "schema_mismatch", "http500", "http401", "truncated"):
        server.mode = mode
        failed = teacher.extraction(SEED)
        rows += [failed, teacher.isomer(SEED, failed, "legal", 1), teacher.isomer(SEED, ext, "legal", 2)]
    errors = [r["error"] for r in rows if r["error"]]
    assert len(errors) == 15  # every failure mode produced error rows
    # The key did go over the wire (so its absence below means something) ...
    assert all(r["headers"]["authorization"] == f"Bearer {SENTINEL_KEY}" for r in server.requests)
    assert any(r.name.startswith("openai") for r in caplog.records)  # the client did log (at DEBUG)
    # ... but never into the rows, their errors, or the logs.
    assert SENTINEL_KEY not in json.dumps(rows)
    assert not any(SENTINEL_KEY in e for e in errors)
    assert SENTINEL_KEY not in caplog.text
    assert "SENTINEL" not in caplog.text


def test_timeout_becomes_error_row(server):
    params = make_params(server.port, **{"teacher.openai.timeout_s": 0.3})
    teacher = make_teacher(params)
    ext = ok_extraction(teacher, server)
    server.mode = "slow"
    row = teacher.isomer(SEED, ext, "medical", 1)
    assert "timed out after 0.3s" in row["error"]
    assert row["problem"] is None


def test_connection_refused_becomes_error_row():
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = make_teacher(make_params(port))
    ext = teacher.extraction(SEED)
    assert ext["dag"] is None and "connection error" in ext["error"]


@pytest.mark.parametrize("raw", ["<html>proxy error</html>", "{oops", "[]"], ids=["html", "broken", "array"])
def test_non_completion_200_body_becomes_error_row(server, params, raw):
    server.mode = "raw"
    server.raw_body = raw
    teacher = make_teacher(params)
    ext = teacher.extraction(SEED)
    assert ext["dag"] is None and ext["error"]


def test_data_flow_with_openai_teacher(server, prefect_api_url, tmp_path, monkeypatch):
    """seeds (JSONL) -> isomers -> gate -> split through Prefect, the teacher being the local server:
    two broken instantiations are rejected by the gate, regenerated, and every group is kept."""
    from conftest import write_params
    from flows.data import data_flow
    from iga.io import read_jsonl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "seeds.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "problem": f"Tom has {i} apples and buys 4 more. How many?", "answer": i + 4}) + "\n"
        for i in range(3)))
    write_params(tmp_path, {"seeds.source": "jsonl", "seeds.path": "seeds.jsonl", "teacher.provider": "openai",
                            "teacher.openai.model": MODEL, "teacher.openai.max_retries": 0,
                            "teacher.openai.base_url": f"http://127.0.0.1:{server.port}/v1"})
    server.fail_first = {"instantiate": 2}
    result = data_flow("params.yaml")

    instances = read_jsonl("data/isomers/instances.jsonl")
    assert len(instances) == 3 * 6 and sum("invalid JSON" in (r["error"] or "") for r in instances) == 2
    rejects = read_jsonl("data/gate/rejects.jsonl")
    assert len(rejects) == 2 and all("teacher_error" in r["reason"] and not r["final"] for r in rejects)
    assert [r["attempt"] for r in read_jsonl("data/gate/regenerated.jsonl")] == [2, 2]
    assert result["gate"]["kept_fraction"] == 1.0 and result["gate"]["regenerations"] == 2
    assert all(r["alignment_score"] == VERIFY["alignment_score"] for r in read_jsonl("data/gate/accepted.jsonl"))
    names = server.names()
    assert names.count("extract") == 3 and names.count("annotate") == 3 and names.count("instantiate") == 18 + 2
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SENTINEL_KEY not in path.read_text(errors="ignore"), path
