"""What the teacher costs: token bounds, prices, the budget, and a per-call ledger with its totals."""
from __future__ import annotations

import json
import math
import statistics
import threading
from dataclasses import asdict, dataclass
from typing import Any

from iga.params import PriceParams


def prompt_bytes(body: dict[str, Any]) -> int:
    """An upper bound on the prompt's tokens: its UTF-8 bytes (a byte-level BPE token spans >= 1 byte),
    plus the JSON schema (structured outputs put it in the prompt) and a few tokens per message."""
    text = sum(len(m["content"].encode()) for m in body["messages"])
    return text + len(json.dumps(body.get("response_format", {})).encode()) + 8 * len(body["messages"]) + 8


def prompt_estimate(body: dict[str, Any]) -> int:
    """A typical prompt token count (~4 bytes per token in English), as rate limiters estimate it."""
    return prompt_bytes(body) // 4 + 1


def cost(price: PriceParams | None, prompt_tokens: int, completion_tokens: int, factor: float = 1.0) -> float | None:
    if price is None:
        return None
    return factor * (price.input * prompt_tokens + price.output * completion_tokens) / 1e6


class Budget:
    """Spending of one stage against a cap; a call reserves its worst case before it is sent, so the
    cap holds even with many calls in flight. Used from the engine's event loop only."""

    def __init__(self, limit_usd: float | None):
        self.limit = limit_usd
        self.spent = 0.0
        self.reserved = 0.0

    def reserve(self, amount: float, force: bool = False) -> bool:
        if not force and self.limit is not None and self.spent + self.reserved + amount > self.limit:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float | None) -> None:
        self.reserved -= reserved
        self.spent += actual or 0.0


@dataclass
class CallRecord:
    key: str
    kind: str  # extract | annotate | instantiate | verify
    mode: str  # online | batch
    cache_hit: bool  # answered from the response cache: nothing paid in this run
    prompt_tokens: int | None = None  # from the response's `usage`
    completion_tokens: int | None = None
    latency_s: float | None = None  # first attempt sent to final answer or failure, backoff and rate-limit
    # waits included (a batch line: the turnaround of the job that answered it)
    cost_usd: float | None = None  # paid in this run (0 for a cache hit; None: no price for the model)
    saved_usd: float | None = None  # a cache hit: what the call cost when it was paid
    attempts: int = 0  # requests sent: 1 + the retries of 429s, 5xx, timeouts, connection errors (batch: jobs)
    error: str | None = None  # the call failed (retries exhausted) or its answer was rejected (bad JSON, ...)


class Ledger:
    """One record per cache key used by a stage, paid or cached; shared by its concurrent chunk tasks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: dict[str, CallRecord] = {}

    def add(self, record: CallRecord) -> None:
        """The first record of a key wins: replays of a cached answer within the run add nothing."""
        with self._lock:
            self.records.setdefault(record.key, record)

    def reject(self, key: str, reason: str) -> None:
        with self._lock:
            if key in self.records and self.records[key].error is None:
                self.records[key].error = reason

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(r) for r in self.records.values()]


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage totals of ledger rows (metrics/teacher.json and MLflow)."""
    paid = [r for r in rows if not r["cache_hit"] and r["prompt_tokens"] is not None]
    latencies = sorted(r["latency_s"] for r in paid if r["latency_s"] is not None)
    costs = [r["cost_usd"] for r in paid]
    by_kind: dict[str, int] = {}
    for r in paid:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    return {
        "calls": len(rows),
        "paid_calls": len(paid),
        "cache_hits": sum(r["cache_hit"] for r in rows),
        "failed_calls": sum(r["prompt_tokens"] is None and not r["cache_hit"] for r in rows),
        "rejected_answers": sum(r["error"] is not None and r["prompt_tokens"] is not None for r in rows),
        "retries": sum(max(0, r["attempts"] - 1) for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in paid),
        "completion_tokens": sum(r["completion_tokens"] for r in paid),
        "cost_usd": None if None in costs else round(sum(costs), 6),
        "saved_usd": round(sum(r["saved_usd"] or 0.0 for r in rows), 6),
        "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "latency_p95_s": round(latencies[math.ceil(0.95 * len(latencies)) - 1], 4) if latencies else None,
        "paid_by_kind": by_kind,
    }
