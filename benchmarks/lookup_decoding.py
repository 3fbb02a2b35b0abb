"""Would prompt-lookup speculative decoding speed up evaluation's greedy loop here? Two measurements, one run.

    python benchmarks/lookup_decoding.py              # the held-out rows, 47 rows x 424 cached positions

1. Tokens a verify pass would give: on the held-out gold CoTs (a proxy for greedy completions), the d tokens
   that followed the latest earlier occurrence of the last n tokens (prompt + CoT so far) are drafted; a pass
   keeps the longest right prefix of the draft plus the one token it computes itself.
2. What such a pass costs: one batched forward pass of `models/base` (fp32, the shared key/value heads read in
   place, as iga.train.decode decodes) that feeds every row 1 + d tokens, against the 1-token pass, at
   evaluation's mean decoding shape; rounds alternate the widths, medians. transformers' `DynamicCache` copies
   the cache at every pass, the same time for every width, so the loop's own cache would show larger ratios.

Prints both and their quotient, tokens a pass / relative cost: the speed-up of decoding before the padding of
rows whose drafts differ in length (> 1: drafting would pay).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from iga.io import read_jsonl  # noqa: E402
from iga.train.decode import shared_kv_heads  # noqa: E402
from iga.train.sft import prompt_text  # noqa: E402
from iga.train.student import load_base  # noqa: E402

DRAFTS = (1, 2, 3, 5, 7)


def tokens_a_pass(seqs: list[tuple[int, list[int]]], n: int, d: int) -> float:
    """Mean tokens gained a pass over `seqs` (prompt length, prompt + gold CoT ids), key n tokens, d drafted."""
    passes = gained = 0
    for start, ids in seqs:
        t = start
        while t < len(ids):
            key, draft = ids[t - n:t], []
            for s in range(t - n - 1, -1, -1):  # the latest earlier occurrence of the key
                if ids[s:s + n] == key:
                    draft = ids[s + n:s + n + d]
                    break
            right = 0
            while right < len(draft) and t + right < len(ids) and draft[right] == ids[t + right]:
                right += 1
            step = min(right + 1, len(ids) - t)
            t, passes, gained = t + step, passes + 1, gained + step
    return gained / passes


def pass_cost(model: Any, rows: int, cached: int, widths: list[int], rounds: int) -> dict[int, float]:
    """Median seconds of a pass feeding each of `rows` rows w tokens after `cached` positions, per width w."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = DynamicCache()
    with torch.no_grad(), shared_kv_heads():
        model(input_ids=torch.randint(0, vocab, (rows, cached), generator=gen), past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        times: dict[int, list[float]] = {w: [] for w in widths}
        for round_ in range(rounds + 1):  # round 0 warms up
            for w in widths:
                ids = torch.randint(0, vocab, (rows, w), generator=gen)
                positions = torch.arange(cached, cached + w).expand(rows, w)
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=torch.ones(rows, cached + w, dtype=torch.long),
                      position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=w)
                if round_:
                    times[w].append(time.perf_counter() - start)
                cache.crop(-w)
    return {w: statistics.median(t) for w, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(ROOT / "models/base"))
    ap.add_argument("--rows", type=int, default=47, help="rows a pass (evaluation's mean at batch 64)")
    ap.add_argument("--cached", type=int, default=424, help="cached positions each row attends to")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    model = load_base(args.base, "float32").eval()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    rows = [r for split in ("test", "ood") for r in read_jsonl(ROOT / f"data/split/{split}.jsonl")]
    seqs = []
    for r in rows:
        prompt = tokenizer(prompt_text(tokenizer, r["problem"]), add_special_tokens=False)["input_ids"]
        seqs.append((len(prompt), prompt + tokenizer(r["cot_solution"], add_special_tokens=False)["input_ids"]))
    print(f"{len(rows)} held-out gold CoTs, {sum(len(i) - s for s, i in seqs)} tokens; tokens a pass by key n "
          f"and drafts d:")
    gain = {(n, d): tokens_a_pass(seqs, n, d) for n in (1, 2) for d in DRAFTS}
    for n in (1, 2):
        print(f"  n {n}: " + ", ".join(f"d {d} {gain[n, d]:.2f}" for d in DRAFTS))

    cost = pass_cost(model, args.rows, args.cached, [1] + [1 + d for d in DRAFTS], args.rounds)
    print(f"pass cost, {args.rows} rows x {args.cached} cached positions, median of {args.rounds} rounds "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads): 1 token {cost[1] * 1000:.0f} ms")
    for d in DRAFTS:
        relative = cost[1 + d] / cost[1]
        print(f"  d {d}: {1 + d} tokens {cost[1 + d] * 1000:.0f} ms, {relative:.2f}x; decoding speed-up at n 1 "
              f"{gain[1, d] / relative:.2f}x, at n 2 {gain[2, d] / relative:.2f}x")


if __name__ == "__main__":
    main()
