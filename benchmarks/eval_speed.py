"""One method's evaluation, this code against an earlier commit's, side by side on the same machine, model,
rows and settings: the wall time of each and whether every score is identical.

    python benchmarks/eval_speed.py                        # erm, against 195c1ab, every held-out row
    python benchmarks/eval_speed.py --method iga --rows 48 --rounds 2

Both sides run `iga.eval.evaluate.score_adapter` (the evaluate stage's whole computation: load and merge
the adapter, generate, the teacher-forced pass for NLL and LCS) in a fresh process each, on `models/base`
and `models/<method>/adapter` with this checkout's `eval` settings and data; the earlier commit is
exported with `git archive` into a temporary folder and imported from there. Rounds alternate old, new.
Identical means: every held-out and external problem scored right or wrong alike, every NLL and LCS value
equal to the last bit. Prints seconds per side and round, the median old/new ratio (> 1: new is faster) and
the comparison; exits 1 when a score differs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run inside each tree: the evaluate stage's computation on the given rows, timed, its scores on stdout.
SIDE = """
import inspect, json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from iga.eval.evaluate import score_adapter
from iga.io import read_jsonl
from iga.params import load_params
settings = json.loads(sys.argv[3])
params = load_params(Path(sys.argv[1]) / "params.yaml", overrides=settings)
seeds = sorted({r["seed_id"] for r in read_jsonl("data/split/test.jsonl")})[:int(sys.argv[4])]
test, ood = ([r for r in read_jsonl(f"data/split/{s}.jsonl") if r["seed_id"] in seeds] for s in ("test", "ood"))
train = {"train": read_jsonl("data/split/train.jsonl")} if "train" in inspect.signature(score_adapter).parameters else {}
t0 = time.perf_counter()
ev = score_adapter(params, Path("models/base"), Path("models") / sys.argv[2] / "adapter", test=test, ood=ood,
                   source="data/split/test.jsonl", name=sys.argv[2], **train)
print(json.dumps({"seconds": time.perf_counter() - t0, "scores": ev["scores"], "lcs": ev["lcs"]}))
"""


def export(ref: str, into: Path) -> Path:
    """The tree of commit `ref`, as files under `into`."""
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def side(tree: Path, method: str, settings: dict, seeds: int) -> dict:
    done = subprocess.run([sys.executable, "-c", SIDE, str(tree), method, json.dumps(settings), str(seeds)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{tree}: the evaluation failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def differences(old: dict, new: dict) -> list[str]:
    """Every score that is not the same in both, named."""
    out = []
    key = lambda r: (r["set"], r["id"])  # noqa: E731
    a, b = {key(r): r for r in old["scores"]}, {key(r): r for r in new["scores"]}
    if a.keys() != b.keys():
        out.append(f"rows differ: {len(a.keys() ^ b.keys())} present on one side only")
    for k in a.keys() & b.keys():
        for field in ("correct", "nll", "tokens"):
            if a[k].get(field) != b[k].get(field):
                out.append(f"{k[0]} {k[1]}: {field} {a[k].get(field)} -> {b[k].get(field)}")
    if old["lcs"] != new["lcs"]:
        out.append("LCS records differ")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="195c1ab", help="the earlier commit")
    ap.add_argument("--method", default="erm")
    ap.add_argument("--rows", type=int, default=0, help="test seeds to evaluate (0: all)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from iga.hardware import describe, resolve_device
    from iga.params import load_params

    from transformers import AutoTokenizer

    from iga.eval.evaluate import decoding
    from iga.io import read_jsonl

    ev = load_params(ROOT / "params.yaml").eval
    budget = decoding(ev.max_new_tokens, AutoTokenizer.from_pretrained(ROOT / "models/base"),
                      read_jsonl(ROOT / "data/split/train.jsonl")).max_new_tokens
    # this checkout's settings on both sides (the earlier commit's defaults differ: dtype auto, 224 tokens)
    settings = {"eval.dtype": ev.dtype, "eval.max_new_tokens": budget, "eval.batch_size": ev.batch_size,
                "eval.nll_batch_size": ev.nll_batch_size, "eval.lcs_groups": ev.lcs_groups,
                "eval.threads": ev.threads, "eval.external": {k: {"limit": v.limit} for k, v in ev.external.items()}}
    seeds = args.rows or 10**9
    print(f"{args.method}: this checkout against {args.against} on {describe(resolve_device('cpu'))}, "
          f"{ev.threads} threads; settings {json.dumps(settings)}")
    with tempfile.TemporaryDirectory(prefix="iga-eval-speed-") as tmp:
        old_tree = export(args.against, Path(tmp))
        times: dict[str, list[float]] = {"old": [], "new": []}
        runs = {}
        for r in range(args.rounds):
            for name, tree in (("old", old_tree), ("new", ROOT)):
                runs[name] = side(tree, args.method, settings, seeds)
                times[name].append(runs[name]["seconds"])
                print(f"round {r + 1}: {name} {runs[name]['seconds']:.1f} s", flush=True)
    ratio = statistics.median(o / n for o, n in zip(times["old"], times["new"]))
    diff = differences(runs["old"], runs["new"])
    n = len(runs["new"]["scores"])
    print(f"old/new: {ratio:.2f}x faster ({statistics.median(times['old']):.1f} s -> "
          f"{statistics.median(times['new']):.1f} s, median of {args.rounds}); {n} scored rows, "
          f"{len(runs['new']['lcs'])} LCS groups: " + ("identical" if not diff else f"{len(diff)} differences"))
    for line in diff[:20]:
        print("  " + line)
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
