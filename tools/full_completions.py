"""The demo's evaluation completions at full length: every held-out and external problem generated with no
early stop (as the evaluation did before its stop rule), for checking that rule against real completions.

    python tools/full_completions.py erm iga      # after `make demo`; writes tests/data/demo_completions.json.gz

The file holds, per method, each completion's token ids (what the rule reads, token by token) with the
problem's set, id and gold answer, and the two lengths the evaluation's decoding is sized from: the
longest training CoT and the longest training line, in tokens (iga.eval.evaluate.decoding).
tests/test_decode.py replays the rule over the ids and checks that no score changes.
"""
from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iga.eval.evaluate import LINE_FACTOR, decoding, for_evaluation  # noqa: E402
from iga.eval.external import load_benchmark  # noqa: E402
from iga.io import read_jsonl  # noqa: E402
from iga.params import load_params  # noqa: E402
from iga.train import decode  # noqa: E402
from iga.train.sft import prompt_text  # noqa: E402
from iga.train.student import load_trained  # noqa: E402

OUT = ROOT / "tests" / "data" / "demo_completions.json.gz"


def main(methods: list[str]) -> None:
    params = load_params(ROOT / "params.yaml")
    torch.set_num_threads(params.eval.threads)
    sets = {"test": read_jsonl(ROOT / "data/split/test.jsonl"), "ood": read_jsonl(ROOT / "data/split/ood.jsonl")}
    sets |= {b: load_benchmark(b, e.limit) for b, e in params.eval.external.items() if e.limit}
    rows = [(name, r) for name, part in sets.items() for r in part]
    out: dict = {"methods": {}}
    for method in methods:
        model, tokenizer = load_trained(ROOT / "models/base", ROOT / "models" / method / "adapter", params.student.dtype)
        model = for_evaluation(model, params.eval.dtype, torch.device("cpu"))
        how = decoding(params.eval.max_new_tokens, tokenizer, read_jsonl(ROOT / "data/split/train.jsonl"))
        out |= {"max_new_tokens": how.max_new_tokens, "longest_line": how.stop.line_tokens // LINE_FACTOR,
                "eval": {"dtype": params.eval.dtype, "batch_size": params.eval.batch_size}}
        texts = [prompt_text(tokenizer, r["problem"]) for _, r in rows]
        t0 = time.perf_counter()
        # the evaluation's generation with no stop rule: what every row generates until its end-of-turn or the budget
        done = decode.generate(model, tokenizer, texts, how.max_new_tokens, params.eval.batch_size, decode.Stop())
        ids = [list(c.ids) for c in done]
        print(f"{method}: {len(texts)} completions, {sum(map(len, ids))} tokens in {time.perf_counter() - t0:.0f} s")
        out["methods"][method] = [{"set": name, "id": r.get("id") or f"{r['group_id']}/{r['domain']}",
                                   "gold": r["answer"], "ids": i} for (name, r), i in zip(rows, ids)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    partial = OUT.with_name(OUT.name + ".partial")  # replaced whole: an interrupted run leaves the old file
    with gzip.open(partial, "wt") as f:
        json.dump(out, f)
    partial.replace(OUT)
    print(f"-> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["erm", "iga"])
