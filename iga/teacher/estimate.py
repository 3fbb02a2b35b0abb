"""A dry run of the openai teacher: how many calls, tokens and dollars the data stages will take.

The first calls of every seed (extract, annotate) are rendered exactly and looked up in the response
cache. Later prompts embed answers that do not exist yet (the DAG, the instance), so their sizes
are assumptions, stated below. "expected" assumes every answer passes on its first try; "maximum"
assumes every try and every regeneration the gate allows, each call using all of max_tokens.
"""
from __future__ import annotations

import json
from typing import Any

from iga.params import Params
from iga.teacher.cache import ResponseCache
from iga.teacher.ledger import cost, prompt_bytes, prompt_estimate
from iga.teacher.openai_teacher import load_prompts, request

# Assumed sizes of what later prompts embed, and typical completion tokens per prompt (gpt-4o-mini
# on GSM8K-like seeds); replace them with your ledger's figures (data/*/ledger.jsonl) once you have them.
ASSUMED_DAG_CHARS = 1500
ASSUMED_INSTANCE_CHARS = 1500
TYPICAL_COMPLETION_TOKENS = {"extract": 400, "annotate": 300, "instantiate": 600, "verify": 100}


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
    return {
        "model": t.openai.model, "mode": t.mode, "seeds": len(seeds), "domains": len(params.domains.all),
        "calls_expected": len(calls), "calls_max": sum(n for _, n in calls), "first_calls_cached": cached,
        "prompt_tokens_expected": typical_in, "completion_tokens_expected": typical_out,
        "prompt_tokens_max": max_in, "completion_tokens_max": max_out,
        "cost_usd_expected": _round(cost(price, typical_in, typical_out, factor)),
        "cost_usd_max": _round(cost(price, max_in, max_out, factor)),
        "budget_usd": t.budget_usd,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


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
        json.dumps(est),
    ])
