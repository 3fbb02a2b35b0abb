"""A fault-injecting OpenAI-compatible server: chat completions, files and batches (Starlette on uvicorn).

Tests run it in a background thread (`FaultServer`) and change its behaviour through `server.state`;
the throughput benchmark runs it in its own process (`python tests/fault_server.py --port P
--latency 0.1`) so that its work does not share a GIL with the client being measured.

Faults are deterministic: whether the n-th arrival of a request fails, and how, is a hash of (the
request body, n, seed), so a run's outcome does not depend on the order in which concurrent calls
arrive. A request body stands for the client's cache key (model, messages, sampling, seed), and
`paid` counts the completions the server billed per body: malformed and truncated ones included,
errors and hangs not.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
SOLVE = {"cot_solution": "Step 1: 3 + 4 = 7\nAnswer: 7", "answer": "7"}
VERIFY_STEP = {"validity": 0.75, "reason": "follows from the problem"}
VALID = {"extract": DAG, "instantiate": INSTANCE, "verify": VERIFY, "annotate": ANNOTATE, "solve": SOLVE,
         "verify_step": VERIFY_STEP}
# Valid JSON, but each misses required fields of its schema.
MISMATCH = {"extract": {"nodes": []}, "instantiate": {"problem": "only a problem"},
            "verify": {"alignment_score": 0.5}, "annotate": {"answer": "7"}, "solve": {"answer": "7"},
            "verify_step": {"reason": "no validity"}}
USAGE = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
# What a fault can be; "malformed" and "truncated" are billed 200s, the others are not.
FAULTS = ("429", "500", "timeout", "malformed", "truncated")


class HiddenLimit:
    """A rate limit the client is not configured with, enforced as OpenAI does and announced in its
    `x-ratelimit-*` headers: requests and tokens per minute, each a bucket that holds one second's worth
    (OpenAI enforces per-minute limits over shorter periods) and refills continuously. A request counts
    its prompt (~4 characters a token) plus its max_tokens, as OpenAI's limiter counts it."""

    def __init__(self, rpm: float | None, tpm: float | None, headers: bool = True):
        self.limits = {k: v for k, v in (("requests", rpm), ("tokens", tpm)) if v}
        self.level = {k: v / 60 for k, v in self.limits.items()}
        self.last = time.monotonic()
        self.headers = headers
        self.limited = 0  # requests answered 429 by this limit

    def take(self, body: dict[str, Any]) -> tuple[float | None, dict[str, str]]:
        """(None, headers) if the request fits, else (seconds until it would, headers). Call under the lock."""
        now = time.monotonic()
        for k, per_minute in self.limits.items():
            self.level[k] = min(per_minute / 60, self.level[k] + (now - self.last) * per_minute / 60)
        self.last = now
        cost = {"requests": 1.0, "tokens": len(json.dumps(body.get("messages", ""))) / 4 + body.get("max_tokens", 0)}
        short = {k: cost[k] - self.level[k] for k in self.limits if self.level[k] < cost[k]}
        wait = max((need * 60 / self.limits[k] for k, need in short.items()), default=None)
        if wait is None:
            for k in self.limits:
                self.level[k] -= cost[k]
        else:
            self.limited += 1
        headers = {}
        if self.headers:
            for k, per_minute in self.limits.items():
                full = (per_minute / 60 - self.level[k]) * 60 / per_minute
                headers |= {f"x-ratelimit-limit-{k}": str(int(per_minute)),
                            f"x-ratelimit-remaining-{k}": str(max(0, int(self.level[k]))),
                            f"x-ratelimit-reset-{k}": f"{full:.3f}s"}
        return wait, headers


def body_key(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _draw(*parts: Any) -> float:
    """A uniform number in [0, 1) that depends only on `parts`."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big") / 2**64


def schema_name(body: Any) -> str | None:
    return ((body or {}).get("response_format") or {}).get("json_schema", {}).get("name")


@dataclass
class State:
    latency_s: float = 0.0          # added to every completion
    fault_rate: float = 0.0         # share of arrivals that fail, drawn per (body, arrival)
    faults: tuple[str, ...] = FAULTS  # the kinds drawn from, uniformly
    max_faults_per_key: int = 2     # arrivals of one body past this many never fail
    seed: int = 0
    retry_after_s: float = 0.05     # sent with every 429 (as retry-after-ms, and retry-after rounded up)
    hang_s: float = 5.0             # a "timeout" fault answers 500 after this long
    mode: str = "ok"                # forced behaviour of every call: ok | bad_json | schema_mismatch |
    modes: dict[str, str] = field(default_factory=dict)  # truncated | http400/401/404/500 | raw | slow
    fail_first: dict[str, int] = field(default_factory=dict)  # schema name -> first N calls answer bad JSON
    raw_body: str = ""              # the body of mode "raw"
    responder: Callable[[str, dict], Any] | None = None  # (schema name, body) -> answer (JSON, or raw text)
    record: bool = True             # keep every request (headers and body) in `requests`
    limit: HiddenLimit | None = None  # an enforced rate limit, announced in x-ratelimit-* headers
    # Batches: share of lines that fail (an error line) or go missing from the output file (per arrival,
    # as online faults, so also capped by max_faults_per_key).
    batch_fail_rate: float = 0.0
    batch_missing_rate: float = 0.0
    batch_polls: int = 2            # retrievals before a batch completes
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[dict[str, Any]] = field(default_factory=list)
    arrivals: Counter = field(default_factory=Counter)   # body key -> completion requests received
    paid: Counter = field(default_factory=Counter)       # body key -> billed completions
    injected: Counter = field(default_factory=Counter)   # fault kind -> how many
    times: list[float] = field(default_factory=list)     # arrival times of completion requests
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_creates: int = 0

    def names(self) -> list[str]:
        return [schema_name(r["body"]) for r in self.requests if r["path"] == "/v1/chat/completions"]


def _error(status: int, message: str, kind: str, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


def completion(state: State, body: dict[str, Any], mode: str) -> tuple[int, dict[str, Any] | str]:
    """The status and body a completion request gets in `mode` (shared by online calls and batch lines)."""
    name = schema_name(body)
    finish = "stop"
    if mode == "ok":
        answer = state.responder(name, body) if state.responder else VALID.get(name, {"ok": True})
        content = answer if isinstance(answer, str) else json.dumps(answer)
    elif mode in ("bad_json", "malformed"):
        content = "{not json"
    elif mode == "schema_mismatch":
        content = json.dumps(MISMATCH[name])
    elif mode == "truncated":
        content, finish = json.dumps(VALID.get(name, {}))[:20], "length"
    else:  # pragma: no cover - a typo in a test
        raise AssertionError(f"unknown mode {mode!r}")
    return 200, {
        "id": f"chatcmpl-{body_key(body)[:12]}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": None, "finish_reason": finish}],
        "usage": USAGE,
    }


def _fault(state: State, key: str, arrival: int) -> str | None:
    if arrival >= state.max_faults_per_key or _draw(state.seed, key, arrival) >= state.fault_rate:
        return None
    return state.faults[int(_draw(state.seed, key, arrival, "kind") * len(state.faults))]


async def chat(request: Request) -> Response:
    state: State = request.app.state.faults
    raw = await request.body()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    key, name = body_key(body), schema_name(body)
    with state.lock:
        arrival = state.arrivals[key]
        state.arrivals[key] += 1
        state.times.append(time.monotonic())
        if state.record:
            state.requests.append({"path": request.url.path, "body": body,
                                   "headers": {k.lower(): v for k, v in request.headers.items()}})
        mode = state.modes.get(name, state.mode)
        if state.fail_first.get(name):
            state.fail_first[name] -= 1
            mode = "bad_json"
        fault = _fault(state, key, arrival) if mode == "ok" else None
        if fault:
            state.injected[fault] += 1
        wait, limit_headers = state.limit.take(body) if state.limit else (None, {})
    if wait is not None:
        return _error(429, "Rate limit reached for requests per min (RPM). Please try again later.", "requests",
                      "rate_limit_exceeded", {"retry-after-ms": str(max(1, int(wait * 1000))), **limit_headers})
    if fault == "429" or mode == "http429":
        return _error(429, "Rate limit reached for requests per min (RPM). Please try again later.", "requests",
                      "rate_limit_exceeded", {"retry-after-ms": str(int(state.retry_after_s * 1000)),
                                              "retry-after": str(max(1, round(state.retry_after_s)))})
    if fault == "500" or mode == "http500":
        return _error(500, "The server had an error while processing your request.", "server_error")
    if fault == "timeout" or mode == "slow":
        await asyncio.sleep(state.hang_s)
        return _error(500, "The server hung and gave up.", "server_error")
    if mode == "http400":
        return _error(400, "Invalid schema for response_format 'extract'.", "invalid_request_error")
    if mode == "http401":
        return _error(401, "Incorrect API key provided: sk-test-*************2345.", "invalid_request_error",
                      "invalid_api_key")
    if mode == "http404":
        return _error(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                      "invalid_request_error", "model_not_found")
    if state.latency_s:
        await asyncio.sleep(state.latency_s)
    if mode == "raw":  # a 200 that is not a chat.completion (a proxy's page, a broken body)
        with state.lock:
            state.paid[key] += 1
        return Response(state.raw_body, media_type="application/json")
    status, payload = completion(state, body, fault or mode)
    with state.lock:
        state.paid[key] += 1
    return JSONResponse(payload, status_code=status, headers=limit_headers)


async def upload(request: Request) -> Response:
    state: State = request.app.state.faults
    form = await request.form()
    if form.get("purpose") != "batch":
        return _error(400, "purpose must be 'batch' here", "invalid_request_error")
    content = await form["file"].read()
    with state.lock:
        file_id = f"file-{len(state.files) + 1}"
        state.files[file_id] = content
    return JSONResponse({"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                         "filename": form["file"].filename, "purpose": "batch", "status": "processed"})


async def file_content(request: Request) -> Response:
    state: State = request.app.state.faults
    file_id = request.path_params["file_id"]
    if file_id not in state.files:
        return _error(404, f"No such File object: {file_id}", "invalid_request_error")
    return Response(state.files[file_id], media_type="application/octet-stream")


def _batch_object(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


async def create_batch(request: Request) -> Response:
    state: State = request.app.state.faults
    body = await request.json()
    if body.get("input_file_id") not in state.files:
        return _error(404, f"No such File object: {body.get('input_file_id')}", "invalid_request_error")
    with state.lock:
        state.batch_creates += 1
        batch_id = f"batch_{state.batch_creates}"
        state.batches[batch_id] = batch = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": int(time.time()), "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "_polls": 0,
        }
    return JSONResponse(_batch_object(batch))


def _run_batch(state: State, batch: dict[str, Any]) -> None:
    """Answer every line of the batch's input file: an output line, an error line, or nothing."""
    out, err = [], []
    for line in state.files[batch["input_file_id"]].decode().splitlines():
        req = json.loads(line)
        key = body_key(req["body"])
        with state.lock:
            arrival = state.arrivals[key]
            state.arrivals[key] += 1
        # Like online faults: drawn per (body, arrival), and never past max_faults_per_key arrivals.
        draw = _draw(state.seed, "batch", key, arrival) if arrival < state.max_faults_per_key else 1.0
        if draw < state.batch_missing_rate:
            continue
        if draw < state.batch_missing_rate + state.batch_fail_rate:
            err.append({"id": f"batch_req_{len(err)}", "custom_id": req["custom_id"], "response": None,
                        "error": {"code": "server_error", "message": "The line could not be processed."}})
            continue
        status, payload = completion(state, req["body"], state.modes.get(schema_name(req["body"]), state.mode))
        with state.lock:
            state.paid[key] += 1
        out.append({"id": f"batch_req_{len(out)}", "custom_id": req["custom_id"], "error": None,
                    "response": {"status_code": status, "request_id": "req_x", "body": payload}})
    with state.lock:
        for name, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                file_id = f"file-{len(state.files) + 1}"
                state.files[file_id] = "".join(json.dumps(x) + "\n" for x in lines).encode()
                batch[name] = file_id
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}
        batch["status"] = "completed"


async def get_batch(request: Request) -> Response:
    state: State = request.app.state.faults
    batch = state.batches.get(request.path_params["batch_id"])
    if batch is None:
        return _error(404, "No such batch", "invalid_request_error")
    batch["_polls"] += 1
    if batch["status"] != "completed":
        if batch["_polls"] >= state.batch_polls:
            _run_batch(state, batch)
        else:
            batch["status"] = "in_progress"
    return JSONResponse(_batch_object(batch))


def app(state: State) -> Starlette:
    application = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/files", upload, methods=["POST"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
    ])
    application.state.faults = state
    return application


class FaultServer:
    """The server on a free 127.0.0.1 port in a background thread: `with FaultServer() as srv: srv.url`."""

    def __init__(self, state: State | None = None):
        self.state = state or State()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(app(self.state), log_level="warning", timeout_graceful_shutdown=1,
                                backlog=1024)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fault server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added to every completion")
    parser.add_argument("--rpm", type=float, help="a hidden requests-per-minute limit (HiddenLimit)")
    parser.add_argument("--tpm", type=float, help="a hidden tokens-per-minute limit")
    parser.add_argument("--no-limit-headers", action="store_true", help="enforce the limit without announcing it")
    args = parser.parse_args()
    limit = HiddenLimit(args.rpm, args.tpm, not args.no_limit_headers) if args.rpm or args.tpm else None
    state = State(latency_s=args.latency, record=False, limit=limit)
    uvicorn.run(app(state), host="127.0.0.1", port=args.port, log_level="warning", backlog=4096,
                access_log=False)


if __name__ == "__main__":
    main()
