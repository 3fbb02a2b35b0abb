"""What an evaluation row costs, measured side by side on the same rows and model: the levers behind
the embedded benchmark's evaluation sizes (docs/measured.md).

- teacher-forced NLL with the vocabulary projection on the completion only (`forward_losses`, what
  evaluation and training run) against full logits, at several batch sizes;
- greedy generation at two batch sizes;
- float32 against bfloat16 weights (bf16 is native only with AMX / AVX512-BF16, iga/hardware.py).

    python benchmarks/eval_cost.py                     # SmolLM2 (models/base) on data/split/test.jsonl
    python benchmarks/eval_cost.py --model tiny --rows 32

Each configuration runs once per round, rounds alternate configurations, and every figure is the
median over rounds of seconds per row; ratios are against the first configuration of their block.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iga.eval.evaluate import decoding, generate  # noqa: E402
from iga.hardware import describe  # noqa: E402
from iga.io import read_jsonl  # noqa: E402
from iga.train.forced import teacher_forced  # noqa: E402
from iga.train.sft import IGNORE, collate, encode  # noqa: E402
from iga.train.student import build_tiny  # noqa: E402


def full_logits_nll(model, tokenizer, rows, batch_size: int) -> None:
    """The straightforward way: logits over every position, then the completion's loss."""
    encoded = sorted((encode(tokenizer, r["problem"], r["cot_solution"]) for r in rows), key=lambda e: -len(e.input_ids))
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate([[e] for e in encoded[start:start + batch_size]], tokenizer.pad_token_id, seed=0)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.labels[:, 1:].reshape(-1),
                            ignore_index=IGNORE, reduction="none")


def rows_and_model(name: str, n: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        model, tokenizer = build_tiny()
        folder = Path(tempfile.mkdtemp(prefix="iga-bench-"))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        name = str(folder)
    rows = read_jsonl("data/split/test.jsonl")[:n]
    return rows, AutoModelForCausalLM.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)


def timed(fn: Callable[[], None], rows: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / rows


def block(title: str, configs: dict[str, Callable[[], None]], rows: int, rounds: int) -> None:
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            times[name].append(timed(fn, rows))
    first = statistics.median(next(iter(times.values())))
    print(f"\n{title}")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:38s} {med:7.3f} s/row   ratio {med / first:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base", help="a model folder, or tiny")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", default="auto", help="auto (the longest training CoT) or a number")
    ap.add_argument("--skip-bf16", action="store_true", help="bf16 is slow where it is emulated (AVX2)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows, model, tokenizer = rows_and_model(args.model, args.rows)
    pairs = [(r["problem"], r["cot_solution"]) for r in rows]
    print(f"{len(rows)} held-out rows, {describe(torch.device('cpu'))}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    block("teacher-forced NLL", {
        "completion-only logits, batch 8": lambda: teacher_forced(model, tokenizer, pairs, 8),
        "full logits, batch 8": lambda: full_logits_nll(model, tokenizer, rows, 8),
        "completion-only + LCS states, batch 8": lambda: teacher_forced(
            model, tokenizer, pairs, 8, layers=range(model.config.num_hidden_layers), skip=[30] * len(rows)),
        "completion-only logits, batch 16": lambda: teacher_forced(model, tokenizer, pairs, 16),
        "completion-only logits, batch 64": lambda: teacher_forced(model, tokenizer, pairs, 64),
    }, len(rows), args.rounds)
    problems = [r["problem"] for r in rows]
    budget = args.max_new_tokens if args.max_new_tokens == "auto" else int(args.max_new_tokens)
    how = decoding(budget, tokenizer, read_jsonl("data/split/train.jsonl"))
    block(f"greedy generation (max_new_tokens {how.max_new_tokens}, evaluation's stop rule)", {
        f"batch {n}": lambda n=n: generate(model, tokenizer, problems, how, n) for n in (64, 32, 128)
    }, len(rows), args.rounds)
    if not args.skip_bf16:
        bf16 = type(model).from_pretrained(model.name_or_path, dtype=torch.bfloat16).eval()
        block("weights (NLL, batch 8)", {
            "float32": lambda: teacher_forced(model, tokenizer, pairs, 8),
            "bfloat16": lambda: teacher_forced(bf16, tokenizer, pairs, 8),
        }, len(rows), args.rounds)


if __name__ == "__main__":
    main()
