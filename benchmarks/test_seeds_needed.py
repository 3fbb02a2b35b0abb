"""How many test seeds would the OOD-accuracy comparison need? The minimum detectable difference of the
test the tables use (sign-flip over test seeds with one training seed, the two-level bootstrap over training
and test seeds with several; α 0.05, power 0.8; accuracies in whole problems: iga.stats.detectable_difference),
simulated at n test seeds drawn from the per-test-seed differences that committed pairs show against a
baseline. A projection: it assumes more test seeds would differ as these 33 do; the training seeds stay the
ones given, so their spread is a floor that more test seeds do not lower. Then what the committed matrix
would cost at each n: every pair's measured training time plus its evaluation time scaled to n test seeds
(the 24 validation problems do not scale), on the CPU each pair ran on, scoring every problem of the n test seeds
or only their OOD ones beyond the first 33.

    python benchmarks/test_seeds_needed.py [--baseline erm] [--seeds 0 1 2] [--n 33 66 132 198 264]

Reads experiments/runs/<run>/draw0/seed<s>/scores.jsonl of every run that has one for each of --seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iga.eval.scores import units_of  # noqa: E402
from iga.io import read_jsonl  # noqa: E402
from iga.stats import detectable_difference  # noqa: E402
from tasks.paths import pair_outputs  # noqa: E402


def ood_by_seed(scores: Path) -> dict[str, list[float]]:
    """Each test seed's OOD accuracy units (iga.eval.scores.units_of: one 0/1 per problem scored)."""
    units = units_of("ood_accuracy", {"scores": read_jsonl(scores), "lcs": []})
    seeds: dict[str, list[float]] = defaultdict(list)
    for seed, value in zip(units.clusters, units.values):
        seeds[seed].append(float(value))
    return seeds


def mde_at(ours: list[dict[str, list[float]]], theirs: list[dict[str, list[float]]], n: int) -> float:
    """The detectable OOD-accuracy difference at `n` test seeds, `ours[k]` and `theirs[k]` the two runs under
    training seed k: the observed test seeds repeated to n, from which the simulation draws its n seeds (so each
    is one of the observed, with equal chance)."""
    common = sorted(set.intersection(*(set(o) & set(t) for o, t in zip(ours, theirs))))
    diffs = np.array([[np.mean(o[s]) - np.mean(t[s]) for s in common] for o, t in zip(ours, theirs)])
    step = np.array([1.0 / len(ours[0][s]) for s in common])
    pick = np.resize(np.arange(len(common)), n)
    return detectable_difference(diffs[:, pick], step[pick])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="erm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the pairs")
    parser.add_argument("--n", type=int, nargs="+", default=[33, 66, 132, 198, 264])
    args = parser.parse_args()
    have = lambda run: all(pair_outputs(run, 0, s)["scores"].is_file() for s in args.seeds)  # noqa: E731
    runs = sorted(p.name for p in Path("experiments/runs").iterdir() if have(p.name))
    if args.baseline not in runs:
        sys.exit(f"{args.baseline}: no committed pair for each of training seeds {args.seeds}")
    base = [ood_by_seed(pair_outputs(args.baseline, 0, s)["scores"]) for s in args.seeds]
    others = [r for r in runs if r != args.baseline]
    print(f"OOD accuracy, minimum detectable difference (points) against {args.baseline}, training seeds "
          f"{args.seeds}, by number of test seeds (each with its observed OOD problems):")
    print(f"{'run':<12}" + "".join(f"{n:>8}" for n in args.n))
    found = defaultdict(list)
    for run in others:
        ours = [ood_by_seed(pair_outputs(run, 0, s)["scores"]) for s in args.seeds]
        cells = []
        for n in args.n:
            mde = 100 * mde_at(ours, base, n)
            found[n].append(mde)
            cells.append(f"{mde:8.1f}")
        print(f"{run:<12}" + "".join(cells))
    print(f"{'median':<12}" + "".join(f"{np.median(found[n]):8.1f}" for n in args.n))
    matrix_cost(args.n)


def matrix_cost(ns: list[int], test_seeds: int = 33) -> None:
    """The committed pairs' hours at n test seeds, by the CPU each ran on (metrics.json's `ran`): a pair's wall time
    with its evaluation (`train.eval_s`, which holds the held-out problems and the validation) scaled by how many
    problems it would score, every held-out one of n test seeds or, beyond the first `test_seeds`, only the OOD
    ones (the comparison that needs the power). A problem costs the same wherever it is; validation does not grow."""
    pairs = [json.loads(p.read_text()) for p in sorted(Path("experiments/runs").glob("*/draw*/seed*/metrics.json"))]
    n = np.array(ns, dtype=float) / test_seeds

    def hours(m: dict, ood_only: bool) -> np.ndarray:
        e, v = m["eval"], m["validation"]
        now = e["n_id"] + e["n_ood"] + v["n"] + v["ood"]["n"]
        then = now + (e["n_ood"] if ood_only else e["n_id"] + e["n_ood"]) * (n - 1)
        return (m["ran"]["end"] - m["ran"]["start"] + m["train"]["eval_s"] * (then / now - 1)) / 3600

    devices = sorted({m["ran"]["device"] for m in pairs})
    print("\nThe committed matrix's compute (hours, 2 cores) at n test seeds, each pair on the CPU it ran on:")
    print(f"{'scored':<14}{'pairs':>6}  {'cpu':<44}" + "".join(f"{x:>8}" for x in ns))
    for what, ood_only in (("every problem", False), (f"OOD beyond {test_seeds}", True)):
        for device in (*devices, "all"):
            mine = [m for m in pairs if device in ("all", m["ran"]["device"])]
            total = sum(hours(m, ood_only) for m in mine)
            print(f"{what:<14}{len(mine):>6}  {device:<44}" + "".join(f"{x:8.1f}" for x in total))


if __name__ == "__main__":
    main()
