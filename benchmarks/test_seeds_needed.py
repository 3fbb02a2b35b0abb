"""How many test seeds would the OOD-accuracy comparison need? The minimum detectable difference of the
test the tables use (sign-flip over test seeds with one training seed; α 0.05, power 0.8; accuracies in
whole problems: iga.stats.detectable_difference), simulated at n test seeds drawn from the per-test-seed
differences that committed pairs show against a baseline. A projection: it assumes more test seeds
would differ as these 33 do.

    python benchmarks/test_seeds_needed.py [--baseline erm] [--seed 0] [--n 33 66 132 198 264]

Reads experiments/runs/<run>/draw0/seed<seed>/scores.jsonl of every run that has one.
"""
from __future__ import annotations

import argparse
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


def mde_at(ours: dict[str, list[float]], theirs: dict[str, list[float]], n: int) -> float:
    """The detectable OOD-accuracy difference at `n` test seeds: the observed ones repeated to n, from which the
    simulation draws its n seeds (so each is one of the observed, with equal chance)."""
    common = sorted(set(ours) & set(theirs))
    diffs = np.array([np.mean(ours[s]) - np.mean(theirs[s]) for s in common])
    step = np.array([1.0 / len(ours[s]) for s in common])
    pick = np.resize(np.arange(len(common)), n)
    return detectable_difference(diffs[pick][None, :], step[pick])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="erm")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the pairs")
    parser.add_argument("--n", type=int, nargs="+", default=[33, 66, 132, 198, 264])
    args = parser.parse_args()
    runs = sorted(p.parents[2].name for p in Path("experiments/runs").glob(f"*/draw0/seed{args.seed}/scores.jsonl"))
    if args.baseline not in runs:
        sys.exit(f"no committed pair {pair_outputs(args.baseline, 0, args.seed)['scores']}")
    base = ood_by_seed(pair_outputs(args.baseline, 0, args.seed)["scores"])
    others = [r for r in runs if r != args.baseline]
    print(f"OOD accuracy, minimum detectable difference (points) against {args.baseline}, training seed "
          f"{args.seed}, by number of test seeds (each with its observed OOD problems):")
    print(f"{'run':<12}" + "".join(f"{n:>8}" for n in args.n))
    found = defaultdict(list)
    for run in others:
        ours = ood_by_seed(pair_outputs(run, 0, args.seed)["scores"])
        cells = []
        for n in args.n:
            mde = 100 * mde_at(ours, base, n)
            found[n].append(mde)
            cells.append(f"{mde:8.1f}")
        print(f"{run:<12}" + "".join(cells))
    print(f"{'median':<12}" + "".join(f"{np.median(found[n]):8.1f}" for n in args.n))


if __name__ == "__main__":
    main()
