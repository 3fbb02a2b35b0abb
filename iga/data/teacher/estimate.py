"""A dry run of the openai teacher: how many calls, tokens and dollars the data stages will take.

The first calls of every seed (extract, annotate) are rendered exactly and looked up in the response
cache. Later prompts embed answers that do not exist yet (the DAG, the instance), so their sizes
are assumptions, stated below. "expected" assumes every answer passes on its first try; "maximum"
assumes every try and every regeneration the gate allows, each call using all of max_tokens. The wall
time is that of the expected calls under teacher.concurrency, rpm and tpm, and names the limit that binds.
"""
from __future__ import annotations

import json
from typing import Any

from iga.data.teacher.cache import ResponseCache
from iga.data.teacher.ledger import cost, prompt_bytes, prompt_estimate
from iga.data.teacher.openai_teacher import load_prompts, request
from iga.params import Params

# Assumed sizes of what later prompts embed, and typical completion tokens per prompt (gpt-4o-mini
# on GSM8K-like seeds); replace them with your ledger's figures (data/*/ledger.jsonl) once you have them.
ASSUMED_DAG_CHARS = 1500
ASSUMED_INSTANCE_CHARS = 1500
TYPICAL_COMPLETION_TOKENS = {"extract": 400, "annotate": 300, "instantiate": 600, "verify": 100}
# A call's latency: time to first token plus decoding (gpt-4o-mini-like); the ledger's latency_s says yours.
ASSUMED_FIRST_TOKEN_S = 0.5
ASSUMED_OUTPUT_TOKENS_PER_S = 80.0


def wall_time(calls: int, latency_s: float, limiter_tokens: int, concurrency: int, rpm: int | None,
              tpm: int | None) -> dict[str, Any]:
    """Seconds the online calls take at the binding one of three limits: `concurrency` calls in flight
    (sum of latencies / concurrency), rpm, and tpm as the engine counts it (prompt estimate + max_tokens
    per call, reserved before the call, whatever it then uses)."""
    bounds = {"concurrency": latency_s / concurrency,
              "rpm": 60.0 * calls / rpm if rpm else 0.0,
              "tpm": 60.0 * limiter_tokens / tpm if tpm else 0.0}
    binding = max(bounds, key=bounds.get)
    return {"seconds": round(bounds[binding], 1), "binding": binding,
            "bounds_s": {k: round(v, 1) for k, v in bounds.items()}}


def estimate(params: Params, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    t, tries = params.teacher, params.gate.max_attempts
    prompts = load_prompts(t.openai.prompt_version)
    cache = ResponseCache(t.cache_dir)
    dag, text = "x" * ASSUMED_DAG_CHARS, "x" * (ASSUMED_INSTANCE_CHARS // 2)
    calls = []  # (call, how many of it at most) per seed
    for seed in seeds:
        first = [request(params, prompts, "extract", 1, 1, problem=seed["problem"])]
        if not seed.get("cot_solution"):
            first.append(request(params, prompts, "annotate", 1, 1, problem=seed["problem"]))
        calls += [(c, tries) for c in first]
        for domain in params.domains.all:  # each attempt: instantiate + verify, each up to `tries` tries
            calls.append((request(params, prompts, "instantiate", 1, 1, domain=domain, problem=seed["problem"],
                                  dag=dag), tries * params.gate.max_attempts))
            calls.append((request(params, prompts, "verify", 1, 1, dag=dag, domain=domain, instance_problem=text,
                                  instance_solution=text), tries * params.gate.max_attempts))
    price = t.prices.get(t.openai.model)
    factor = t.batch_discount if t.mode == "batch" else 1.0
    typical_in = sum(prompt_estimate(c.body) for c, _ in calls)
    typical_out = sum(TYPICAL_COMPLETION_TOKENS[c.kind] for c, _ in calls)
    max_in = sum(n * prompt_bytes(c.body) for c, n in calls)
    max_out = sum(n * t.openai.max_tokens for _, n in calls)
    cached = sum(cache.get(c.key) is not None for c, _ in calls if c.kind in ("extract", "annotate"))
    latency = sum(ASSUMED_FIRST_TOKEN_S + TYPICAL_COMPLETION_TOKENS[c.kind] / ASSUMED_OUTPUT_TOKENS_PER_S
                  for c, _ in calls)
    limiter_tokens = sum(prompt_estimate(c.body) + t.openai.max_tokens for c, _ in calls)
    return {
        "model": t.openai.model, "mode": t.mode, "seeds": len(seeds), "domains": len(params.domains.all),
        "calls_expected": len(calls), "calls_max": sum(n for _, n in calls), "first_calls_cached": cached,
        "prompt_tokens_expected": typical_in, "completion_tokens_expected": typical_out,
        "prompt_tokens_max": max_in, "completion_tokens_max": max_out,
        "cost_usd_expected": _round(cost(price, typical_in, typical_out, factor)),
        "cost_usd_max": _round(cost(price, max_in, max_out, factor)),
        "budget_usd": t.budget_usd,
        "wall_time_expected": None if t.mode == "batch" else
        wall_time(len(calls), latency, limiter_tokens, t.concurrency, t.rpm, t.tpm),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _duration(wall: dict[str, Any] | None) -> str:
    if wall is None:
        return "batch mode: the Batch API answers within 24 h (usually much sooner)"
    b = wall["bounds_s"]
    limits = f"concurrency {b['concurrency']:,.0f} s, rpm {b['rpm']:,.0f} s, tpm {b['tpm']:,.0f} s"
    hint = {"tpm": "tpm counts max_tokens per call: a lower teacher.openai.max_tokens or a higher teacher.tpm helps",
            "rpm": "raise teacher.rpm if your account allows", "concurrency": "raise teacher.concurrency"}
    return (f"~{wall['seconds'] / 60:,.1f} min expected, bound by {wall['binding']} ({limits}; "
            f"{hint[wall['binding']]}); the first tries only: retries and regenerations add to it")


def render(est: dict[str, Any]) -> str:
    price = "no price for this model in teacher.prices" if est["cost_usd_expected"] is None else \
        f"${est['cost_usd_expected']:,.2f} expected, ${est['cost_usd_max']:,.2f} at most"
    return "\n".join([
        f"teacher {est['model']} ({est['mode']}): {est['seeds']} seeds x {est['domains']} domains",
        f"  calls:             {est['calls_expected']:,} expected, {est['calls_max']:,} at most "
        f"(every try and regeneration); {est['first_calls_cached']:,} first calls already cached",
        f"  prompt tokens:     {est['prompt_tokens_expected']:,} expected, {est['prompt_tokens_max']:,} at most",
        f"  completion tokens: {est['completion_tokens_expected']:,} expected, {est['completion_tokens_max']:,} at most",
        f"  cost:              {price}; budget: {est['budget_usd'] if est['budget_usd'] is not None else 'none'}",
        f"  wall time:         {_duration(est['wall_time_expected'])}",
        json.dumps(est),
    ])
