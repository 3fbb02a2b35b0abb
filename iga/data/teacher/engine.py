"""The openai teacher's calls at scale: concurrent or batched, rate-limited, retried, cached, accounted.

One engine per teacher stage, shared by the stage's concurrent chunk tasks. It owns an event loop
in a background thread; on it live the async client, the window of calls in flight (at most
`teacher.concurrency`, halved on a 429), the requests- and tokens-per-minute buckets (set, or learned
from the server's x-ratelimit headers: iga.data.teacher.ratelimit) and the budget, so all of them hold
across chunk tasks. The teacher's pipeline stays plain synchronous code: it *replays* against
the response cache (`answer`), a call not answered yet raises `Pending`, and the teacher collects
those from every item of a chunk and has them fetched together (`fetch`), online or as one Batch
API job. A replay after the fetch finds the answers and moves on to the next call.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Coroutine, TypeVar

import httpx
import openai

from iga.data.teacher.cache import ResponseCache
from iga.data.teacher.ledger import Budget, CallRecord, Ledger, cost, prompt_bytes, prompt_estimate
from iga.data.teacher.ratelimit import PACE, TokenBucket, Window, announced_limits
from iga.errors import BudgetExceeded, TeacherAbort, TeacherError
from iga.io import atomic_write_text
from iga.params import Params

T = TypeVar("T")
# Statuses worth another try; any other 4xx is a request or account problem that a retry cannot fix.
RETRYABLE = {408, 409, 429}
BATCH_DONE = {"completed", "failed", "expired", "cancelled"}


@dataclass(frozen=True)
class Call:
    key: str  # the response cache key (iga.data.teacher.cache.cache_key)
    kind: str  # the prompt: extract | annotate | instantiate | verify
    body: dict[str, Any]  # the chat.completions request


class Pending(Exception):
    """A replay reached a call with no answer yet. Not an IGAError: no teacher handler swallows it."""

    def __init__(self, call: Call):
        super().__init__(call.key)
        self.call = call


def is_fatal(e: openai.APIStatusError) -> bool:
    """A request or account problem that no retry can fix: a 4xx other than 408/409/429, or no quota."""
    quota = e.status_code == 429 and getattr(e, "code", None) == "insufficient_quota"
    return quota or (e.status_code < 500 and e.status_code not in RETRYABLE)


def retry_after_s(headers: httpx.Headers) -> float | None:
    """The server's Retry-After, from `retry-after-ms` (OpenAI) or `retry-after` (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    if (value := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
            except (TypeError, ValueError):
                return None
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CallEngine:
    def __init__(self, params: Params, api_key: str, budget_usd: float | None):
        t = params.teacher
        self.cfg = t.openai
        self.mode = t.mode
        self.cache = ResponseCache(t.cache_dir)
        self.ledger = Ledger()
        self.budget = Budget(budget_usd)
        self.price = t.prices.get(self.cfg.model)
        self.batch_discount = t.batch_discount
        self.batch_poll_s = t.batch_poll_s
        self.failures: dict[str, str] = {}  # key -> why the call failed after its retries (not cached)
        self.abort: TeacherAbort | None = None  # set once; every later call is skipped
        self._unreachable = 0  # connection errors in a row, across calls (the breaker)
        self._buckets = {kind: TokenBucket.paced(limit) for kind, limit in (("requests", t.rpm), ("tokens", t.tpm))
                         if limit}
        self._configured = set(self._buckets)  # limits set in params; the others are learned from the server
        self.learned: dict[str, float] = {}  # limits the server announced (x-ratelimit-limit-*)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-calls", daemon=True)
        self._thread.start()
        self._client = self._run(self._open(api_key, t.concurrency))

    async def _open(self, api_key: str, concurrency: int) -> openai.AsyncOpenAI:
        self._window = Window(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        # Our own retry loop (below) replaces the client's: it must see every attempt for the ledger.
        return openai.AsyncOpenAI(api_key=api_key, base_url=self.cfg.base_url, timeout=self.cfg.timeout_s,
                                  max_retries=0, http_client=openai.DefaultAioHttpClient(limits=limits))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():  # a coroutine sent to a stopped loop would never finish
            coro.close()
            raise RuntimeError("the teacher's call engine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the replay side (any thread)

    def answer(self, call: Call) -> str:
        """The response body of `call` from the cache; TeacherError if the call failed for good in this
        run; Pending if it has not been made yet."""
        entry = self.cache.get(call.key)
        if entry is not None:
            self.ledger.add(CallRecord(call.key, call.kind, entry["mode"], cache_hit=True,
                                       prompt_tokens=entry["prompt_tokens"],
                                       completion_tokens=entry["completion_tokens"], cost_usd=0.0,
                                       saved_usd=entry["cost_usd"]))
            return entry["body"]
        if call.key in self.failures:
            raise TeacherError(self.failures[call.key])
        raise Pending(call)

    def fetch(self, calls: list[Call]) -> None:
        """Make the calls: each answer lands in the cache, each failure in `failures`. Raises
        TeacherAbort (after the calls in flight have finished) on a fatal error or the budget."""
        if not self.abort:
            self._run(self._batch(calls) if self.mode == "batch" else self._online(calls))
        if self.abort:
            raise self.abort

    # ------------------------------------------------------------------ online calls (the loop thread)

    def _store(self, call: Call, body: str, latency_s: float, attempts: int, reserved: float, mode: str) -> None:
        """Cache a paid answer first (a kill right after loses nothing), then account for it. Written on
        the loop itself: a worker thread per write measured 5 % slower (benchmarks/teacher_throughput.py)."""
        try:
            usage = json.loads(body).get("usage") or {}
        except (ValueError, AttributeError):
            usage = {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        paid = cost(self.price, prompt, completion, self.batch_discount if mode == "batch" else 1.0)
        self.cache.put(call.key, {"key": call.key, "kind": call.kind, "mode": mode, "request": call.body,
                                  "body": body, "prompt_tokens": prompt, "completion_tokens": completion,
                                  "latency_s": round(latency_s, 4), "cost_usd": paid, "received_at": _now()})
        self.budget.settle(reserved, paid)
        self.ledger.add(CallRecord(call.key, call.kind, mode, cache_hit=False, prompt_tokens=prompt,
                                   completion_tokens=completion, latency_s=round(latency_s, 4), cost_usd=paid,
                                   attempts=attempts))

    def _fail(self, call: Call, mode: str, attempts: int, reason: str, latency_s: float | None = None) -> None:
        self.failures[call.key] = reason
        self.ledger.add(CallRecord(call.key, call.kind, mode, cache_hit=False, attempts=attempts, error=reason,
                                   latency_s=None if latency_s is None else round(latency_s, 4)))

    def _worst_cost(self, call: Call, factor: float = 1.0) -> float:
        return cost(self.price, prompt_bytes(call.body), call.body["max_tokens"], factor) or 0.0

    def _over_budget(self) -> BudgetExceeded:
        return BudgetExceeded(
            f"teacher.budget_usd: the next call could take this stage past its budget of "
            f"${self.budget.limit:.4f} (spent ${self.budget.spent:.4f}); stopped before it. Every response "
            f"received is cached under {self.cache.root}: raise the budget and re-run to continue without paying again")

    def _where(self) -> str:
        return self.cfg.base_url or str(self._client.base_url)

    def _fatal(self, call: Call, e: openai.APIStatusError) -> TeacherAbort:
        return TeacherAbort(f"{call.kind}: HTTP {e.status_code} from {self._where()} for model {self.cfg.model!r}: "
                            f"{str(e.message)[:300]} - not retried: fix teacher.openai or OPENAI_API_KEY and "
                            f"re-run (responses received so far are cached)")

    def _backoff(self, retry: int, server_wait: float | None) -> float:
        if server_wait is not None:  # the server knows when it will take us again
            return server_wait * (1 + 0.1 * random.random())
        return random.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2**retry))

    async def _limit(self, tokens: int) -> None:
        units = {"requests": 1, "tokens": tokens}
        wait = max((bucket.reserve(units[kind]) for kind, bucket in self._buckets.items()), default=0.0)
        if wait:
            await asyncio.sleep(wait)

    def _learn(self, headers: httpx.Headers) -> None:
        """Pace at PACE of the limits the server announces, unless params set them."""
        for kind, limit in announced_limits(headers).items():
            if kind not in self._configured and self.learned.get(kind) != limit:
                self.learned[kind] = limit
                self._buckets[kind] = bucket = TokenBucket.paced(PACE * limit)
                bucket.level = 0.0  # nothing saved up: the calls that brought the news drained the server's

    async def _online(self, calls: list[Call]) -> None:
        await asyncio.gather(*(self._call(c) for c in calls))

    def _connection_failed(self, reason: str) -> None:
        """Count a connection error; `teacher.openai.breaker` of them in a row, across calls, stop the stage:
        a closed port or a wrong host would otherwise retry every call of the stage with backoff."""
        self._unreachable += 1
        if self._unreachable >= self.cfg.breaker and not self.abort:
            self.abort = TeacherAbort(
                f"cannot reach the teacher at {self._where()}: {self._unreachable} connection errors in a row "
                f"(teacher.openai.breaker), the last: {reason} - check teacher.openai.base_url and the network; "
                f"nothing was paid for these calls")

    async def _call(self, call: Call) -> None:
        worst = self._worst_cost(call)
        tokens = prompt_estimate(call.body) + call.body["max_tokens"]
        first: float | None = None  # when the first attempt was sent: the ledger's latency is the whole call's
        async with self._window:
            for retry in range(self.cfg.max_retries + 1):
                if self.abort:
                    return
                await self._limit(tokens)
                if not self.budget.reserve(worst):
                    self.abort = self.abort or self._over_budget()
                    return
                server_wait = None
                start = time.monotonic()
                first = first or start
                try:
                    # The client's low-level post: `chat.completions.create` would first walk the whole
                    # body (messages, JSON schema) through its type transforms, 40 % of our CPU per call.
                    response = await self._client.post("/chat/completions", body=call.body, cast_to=httpx.Response)
                    body = response.text
                except openai.APIStatusError as e:
                    self._unreachable = 0
                    self.budget.settle(worst, None)
                    if is_fatal(e):
                        self.abort = self.abort or self._fatal(call, e)
                        return
                    self._learn(e.response.headers)
                    if e.status_code == 429:
                        self._window.cut(start)
                    reason, server_wait = f"HTTP {e.status_code}", retry_after_s(e.response.headers)
                except openai.APIConnectionError as e:  # APITimeoutError included
                    self.budget.settle(worst, None)
                    # the aiohttp transport (openai._vendor.httpx_aiohttp) reports a refused connection as a
                    # ConnectTimeout: tell them apart by the clock
                    timed_out = isinstance(e, openai.APITimeoutError) and \
                        time.monotonic() - start >= 0.9 * self.cfg.timeout_s
                    if timed_out:
                        reason = f"timed out after {self.cfg.timeout_s}s"
                    else:
                        reason = f"connection error: {str(e.__cause__ or e)[:200]}"
                        self._connection_failed(reason)
                        if self.abort:
                            return
                else:
                    self._unreachable = 0
                    self._learn(response.headers)
                    self._window.grow()
                    self._store(call, body, time.monotonic() - first, retry + 1, worst, "online")
                    return
                if retry < self.cfg.max_retries:
                    await asyncio.sleep(self._backoff(retry, server_wait))
            self._fail(call, "online", self.cfg.max_retries + 1,
                       f"{call.kind}: {reason} (after {self.cfg.max_retries + 1} tries)", time.monotonic() - first)

    # ------------------------------------------------------------------ the Batch API (the loop thread)

    async def _control(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A Files/Batches API call, retried like a completion; a fatal error aborts the stage."""
        for retry in range(self.cfg.max_retries + 1):
            server_wait = None
            try:
                return await fn(*args, **kwargs)
            except openai.APIStatusError as e:
                if is_fatal(e):
                    raise TeacherAbort(f"batch {what}: HTTP {e.status_code}: {str(e.message)[:300]}") from None
                reason, server_wait = f"HTTP {e.status_code}", retry_after_s(e.response.headers)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                reason = type(e).__name__
            if retry < self.cfg.max_retries:
                await asyncio.sleep(self._backoff(retry, server_wait))
        raise TeacherAbort(f"batch {what}: {reason} after {self.cfg.max_retries + 1} tries; re-run to resume")

    async def _batch(self, calls: list[Call]) -> None:
        """Rounds of batch jobs until every call is answered: a failed or missing line goes back into
        the next round's job; after max_retries + 1 rounds it is a failed call, never a silent gap."""
        queue, reasons = list(calls), {}
        for round_ in range(self.cfg.max_retries + 1):
            if not queue:
                return
            try:
                reasons = await self._batch_round(queue, round_)
            except TeacherAbort as e:
                self.abort = self.abort or e
            if self.abort:
                return
            queue = [c for c in queue if c.key in reasons]
        for c in queue:
            self._fail(c, "batch", self.cfg.max_retries + 1,
                       f"{c.kind}: no answer in {self.cfg.max_retries + 1} batch jobs (last: {reasons[c.key]})")

    async def _batch_round(self, calls: list[Call], round_: int) -> dict[str, str]:
        """One batch job for `calls` (or the job a killed run left for the same calls: polled, not
        resubmitted). Returns why each unanswered call got no answer."""
        job_file = self.cache.root / "batches" / f"{hashlib.sha256(''.join(sorted(c.key for c in calls)).encode()).hexdigest()}.json"
        job = json.loads(job_file.read_text()) if job_file.is_file() else None
        if job is None:
            affordable = []
            for c in calls:
                if not self.budget.reserve(self._worst_cost(c, self.batch_discount)):
                    self.abort = self._over_budget()  # submit what fits; the stage stops after it
                    break
                affordable.append(c)
            if not affordable:
                return {}
            calls = affordable
            lines = "".join(json.dumps({"custom_id": c.key, "method": "POST", "url": "/v1/chat/completions",
                                        "body": c.body}) + "\n" for c in calls)
            upload = await self._control("upload", self._client.files.create,
                                         file=("teacher-batch.jsonl", lines.encode()), purpose="batch")
            created = await self._control("create", self._client.batches.create, input_file_id=upload.id,
                                          endpoint="/v1/chat/completions", completion_window="24h")
            job = {"batch_id": created.id, "input_file_id": upload.id, "submitted": time.time(),
                   "keys": [c.key for c in calls]}
            atomic_write_text(job_file, json.dumps(job))  # before any wait: a killed run polls this job
        else:  # submitted by a run that was stopped: already spent, whatever the budget says now
            for c in calls:
                self.budget.reserve(self._worst_cost(c, self.batch_discount), force=True)
        by_key = {c.key: c for c in calls}
        while True:
            batch = await self._control("poll", self._client.batches.retrieve, job["batch_id"])
            if batch.status in BATCH_DONE:
                break
            await asyncio.sleep(self.batch_poll_s)
        reasons = {k: f"batch {batch.status}, line missing from its output" for k in by_key}
        latency = time.time() - job["submitted"]
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._control("download", self._client.files.content, file_id)
            for line in content.text.splitlines():
                row = json.loads(line)
                key, response = row.get("custom_id"), row.get("response") or {}
                if key not in by_key or key not in reasons:
                    continue
                if response.get("status_code") == 200:
                    self._store(by_key[key], json.dumps(response["body"]), latency, round_ + 1,
                                self._worst_cost(by_key[key], self.batch_discount), "batch")
                    del reasons[key]
                else:
                    error = row.get("error") or (response.get("body") or {}).get("error") or {}
                    reasons[key] = f"batch line: HTTP {response.get('status_code')} {error.get('message', '')}"[:300]
        for key in reasons:
            self.budget.settle(self._worst_cost(by_key[key], self.batch_discount), None)
        job_file.unlink(missing_ok=True)
        return reasons
