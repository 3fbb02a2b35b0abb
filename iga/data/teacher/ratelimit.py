"""How fast the teacher's calls go: token buckets for requests and tokens per minute, and a window of
calls in flight that adapts to the server (additive increase, multiplicative decrease on a 429).

With `teacher.rpm` / `teacher.tpm` set, those buckets are fixed. Unset, the engine learns the limits
from the `x-ratelimit-limit-requests` / `-tokens` headers that OpenAI-compatible servers send and
paces at PACE of them, a margin for the jitter between our clock and the server's; a server that sends
no headers is found by the window alone. benchmarks/teacher_throughput.py --hidden-rpm measures both.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import httpx

PACE = 0.95  # share of a server's announced limit the engine aims at
LIMIT_HEADERS = {"requests": "x-ratelimit-limit-requests", "tokens": "x-ratelimit-limit-tokens"}


class TokenBucket:
    """`per_minute` units refilled continuously, at most `burst` saved up. A caller reserves units and
    is told how long to wait for them, so waiting callers queue in order instead of polling."""

    def __init__(self, per_minute: float, burst: float):
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.burst = burst
        self.level = burst
        self.last = time.monotonic()

    @classmethod
    def paced(cls, per_minute: float) -> "TokenBucket":
        """A bucket for a per-minute limit, with one second's worth saved up at most."""
        return cls(per_minute, max(1.0, per_minute / 60))

    def reserve(self, units: float) -> float:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.last) * self.rate)
        self.last = now
        self.level -= units
        return max(0.0, -self.level / self.rate)


def announced_limits(headers: httpx.Headers) -> dict[str, float]:
    """{"requests" | "tokens": per-minute limit} from a response's x-ratelimit-limit-* headers."""
    limits = {}
    for kind, name in LIMIT_HEADERS.items():
        try:
            value = float(headers.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            limits[kind] = value
    return limits


class Window:
    """At most `size` calls in flight, 1 <= size <= limit (teacher.concurrency). Every answer adds
    1 / size (one call per window's worth of answers); a 429 halves it, once per round of calls: the
    429s of calls sent before the last cut report the same overload and do not cut again.

    Waiters queue in order and exactly as many are woken as there is room (a Condition woken at every
    exit cost 40 % of the engine's throughput with thousands of calls waiting)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = float(limit)
        self.in_flight = 0
        self.cut_at = 0.0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> "Window":
        if self._waiting or self.in_flight >= int(self.size):
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn  # _wake counts us in before it wakes us
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # woken, then cancelled: give the room on
                    self.in_flight -= 1
                    self._wake()
                raise
        else:
            self.in_flight += 1
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.in_flight -= 1
        self._wake()

    def grow(self) -> None:
        self.size = min(float(self.limit), self.size + 1.0 / self.size)
        self._wake()

    def cut(self, sent_at: float) -> None:
        if sent_at >= self.cut_at:
            self.size = max(1.0, self.size / 2)
            self.cut_at = time.monotonic()

    def _wake(self) -> None:
        while self._waiting and self.in_flight < int(self.size):
            turn = self._waiting.popleft()
            if not turn.done():
                self.in_flight += 1
                turn.set_result(None)
