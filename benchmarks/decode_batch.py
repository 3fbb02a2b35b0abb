"""Is evaluation's decoding batch (`eval.batch_size`, 64) still the fastest now that attention reads the shared
key/value heads in place? One run, the sizes alternated.

    python benchmarks/decode_batch.py                     # erm's adapter, every held-out problem, 64/96/128
    python benchmarks/decode_batch.py --sizes 64 128 --rounds 2

Greedy completions of the held-out problems (`data/split/test.jsonl` and `ood.jsonl`) by `models/base` with
`models/<method>/adapter` merged, as evaluation decodes them (iga.eval.evaluate: fp32, the budget and stop
rule sized from the training CoTs), at each batch size; the prompts are encoded by the loop itself (evaluation
starts most of them from its teacher-forced pass's states instead: the same work at every size). Prints each
size's median seconds, its speed against the first size (> 1: faster) and how many completions are token for
token those of the first size; exits 1 when any differs, since evaluation's scores would then move too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from iga.eval.evaluate import decoding, for_evaluation, generate  # noqa: E402
from iga.hardware import describe, resolve_device  # noqa: E402
from iga.io import read_jsonl  # noqa: E402
from iga.params import load_params  # noqa: E402
from iga.train.student import load_trained  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="erm")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    ev = load_params(ROOT / "params.yaml").eval
    torch.set_num_threads(ev.threads)
    device = resolve_device("cpu")
    model, tokenizer = load_trained(ROOT / "models/base", ROOT / "models" / args.method / "adapter")
    model = for_evaluation(model, "float32", device)
    how = decoding(ev.max_new_tokens, tokenizer, read_jsonl(ROOT / "data/split/train.jsonl"))
    problems = [r["problem"] for name in ("test", "ood") for r in read_jsonl(ROOT / f"data/split/{name}.jsonl")]
    print(f"{args.method}: {len(problems)} held-out problems, budget {how.max_new_tokens} tokens, fp32, "
          f"{ev.threads} threads, {describe(device)}")
    seconds: dict[int, list[float]] = {size: [] for size in args.sizes}
    made: dict[int, list[tuple[int, ...]]] = {}
    for r in range(args.rounds):
        for size in args.sizes:
            t0 = time.perf_counter()
            made[size] = [c.ids for c in generate(model, tokenizer, problems, how, size)]
            seconds[size].append(time.perf_counter() - t0)
            print(f"round {r + 1}: batch {size} {seconds[size][-1]:.1f} s, {sum(map(len, made[size]))} tokens",
                  flush=True)
    first = args.sizes[0]
    differ = 0
    for size in args.sizes:
        same = sum(a == b for a, b in zip(made[first], made[size]))
        differ += same < len(problems)
        print(f"batch {size}: {statistics.median(seconds[size]):.1f} s, "
              f"{statistics.median(seconds[first]) / statistics.median(seconds[size]):.2f}x against {first}; "
              f"{same}/{len(problems)} completions identical to batch {first}'s")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
