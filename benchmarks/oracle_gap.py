"""Can the benchmark separate methods? A trained student against the no-hint oracle: the same seeds,
split and training, with `teacher.shortcut_rate: 0` (no problem carries a hint). The oracle is the upper
reference (what the reasoning alone gives), the student's distance below it out of domain is what an
invariance method can win back. Paired problem by problem over test seeds (iga.eval.scores.compare),
by problem family, and with the student's cue reliance (the share of hinted problems answered as the
hint says).

    python benchmarks/oracle_gap.py ORACLE STUDENT [--method erm] [--challenger SOURCE METHOD] [--seeds 0 1 2]

With --challenger (e.g. IGA trained on the same data as the student): the challenger against the student,
paired, and the fraction of the student-to-oracle gap it closes (iga.eval.scores.gap_closed).

Each of ORACLE, STUDENT and SOURCE is either a project checkout after `dvc repro evaluate@<method>`
(models/<method>/scores.jsonl, data/seeds/seeds.jsonl; the oracle's under shortcut_rate 0, the student's under
the hints to measure), one experiment pair's scores.jsonl (experiments/runs/<run>/draw0/seed<s>/, the oracle
being the run `oracle`) or, with --seeds, an experiment run's folder (experiments/runs/<run>): its draw-0 pairs
on those training seeds, the k-th seed of each run paired with the k-th of the others (iga.eval.scores: the
intervals and tests then resample training seeds too). Pairs are read with the data/ of the checkout it runs in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iga.data.domains import stated_hint  # noqa: E402
from iga.errors import DataError  # noqa: E402
from iga.eval.scores import compare, detectable, estimate, gap_closed  # noqa: E402
from iga.io import read_jsonl  # noqa: E402


def located(source: Path, method: str) -> tuple[Path, Path]:
    """(the scores file, the checkout whose data/ it was scored on) of a checkout or a pair's scores.jsonl."""
    return (source, Path(".")) if source.is_file() else (source / "models" / method / "scores.jsonl", source)


def sources(source: Path, train_seeds: list[int] | None) -> list[Path]:
    """One source per training seed: the source itself, or with --seeds a run folder's draw-0 pairs."""
    if train_seeds is None:
        return [source]
    pairs = [source / "draw0" / f"seed{s}" / "scores.jsonl" for s in train_seeds]
    missing = [str(p) for p in pairs if not p.is_file()]
    if missing:
        raise DataError(f"--seeds: no scores at {', '.join(missing)} (has that pair run? `dvc status`)")
    return pairs


def evaluation(source: Path, method: str, families: set[str] | None, seeds: dict[str, str],
               hint: str | None = None) -> dict:
    """The method's scores, restricted to the test seeds of `families` (None: all) and, with `hint`
    ("right" / "wrong"), to the problems whose planted hint names the right / the wrong answer."""
    scores, root = located(source, method)
    rows = read_jsonl(scores)
    truth = {}
    if hint:
        data = read_jsonl(root / "data/split/test.jsonl") + read_jsonl(root / "data/split/ood.jsonl")
        stated = {f"{r['group_id']}/{r['domain']}": (stated_hint(r["problem"], r["domain"]), r["answer"]) for r in data}
        truth = {key: (said == answer) == (hint == "right") for key, (said, answer) in stated.items()
                 if said is not None}  # a problem without a hint is neither
    return {"scores": [r for r in rows if r["set"] in ("test", "ood")
                       and (families is None or seeds[r["seed_id"]] in families) and truth.get(r["id"], not hint)]}


def cell(evaluations: list[dict], figure: str) -> str:
    est, lo, hi, n = estimate(evaluations, figure)
    return f"{100 * est:5.1f} [{100 * lo:5.1f}, {100 * hi:5.1f}] (n {n})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("oracle", type=Path)
    parser.add_argument("student", type=Path)
    parser.add_argument("--method", default="erm")
    parser.add_argument("--challenger", nargs=2, metavar=("SOURCE", "METHOD"))
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="training seeds: each source is an experiment run's folder, experiments/runs/<run>")
    args = parser.parse_args()
    root = located(sources(args.student, args.seeds)[0], args.method)[1]
    seeds = {s["seed_id"]: s["family"] for s in read_jsonl(root / "data/seeds/seeds.jsonl")}
    others = [args.oracle] + ([Path(args.challenger[0])] if args.challenger else [])
    for other in others:
        data = located(sources(other, args.seeds)[0], args.method)[1]
        if {s["seed_id"]: s["family"] for s in read_jsonl(data / "data/seeds/seeds.jsonl")} != seeds:
            raise DataError(f"{other} and {args.student} were built from different seeds: nothing to pair")
    over = f"training seeds {args.seeds} and test seeds" if args.seeds and len(args.seeds) > 1 else "test seeds"
    print(f"{args.method} ({args.student}) against the no-hint oracle ({args.oracle}); accuracy in %, 95 % "
          f"intervals over {over}; difference = student − oracle, two-sided, the test named on each line")
    of = lambda source, method, families, hint=None: [  # noqa: E731  one evaluation per training seed
        evaluation(s, method, families, seeds, hint) for s in sources(source, args.seeds)]
    for name, families in (("all", None), ("yes/no (implication, comparison)", {"implication", "comparison"}),
                           ("numeric (arithmetic)", {"arithmetic"})):
        oracle = of(args.oracle, args.method, families)
        student = of(args.student, args.method, families)
        print(f"\n{name}")
        for figure, label in (("id_accuracy", "ID "), ("ood_accuracy", "OOD")):
            c = compare(student, oracle, figure)
            print(f"  {label} oracle {cell(oracle, figure)}  student {cell(student, figure)}  "
                  f"difference {100 * c.delta:+.1f} [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}] p {c.p:.2g} ({c.test})")
        if args.challenger:
            root, method = Path(args.challenger[0]), args.challenger[1]
            challenger = of(root, method, families)
            for figure, label in (("id_accuracy", "ID "), ("ood_accuracy", "OOD")):
                c = compare(challenger, student, figure)
                mde, _ = detectable(challenger, student, figure)
                print(f"  {label} {method} {cell(challenger, figure)}  {method} − student {100 * c.delta:+.1f} "
                      f"[{100 * c.lo:+.1f}, {100 * c.hi:+.1f}] p {c.p:.2g}; detectable {100 * mde:.1f}")
            try:
                f, lo, hi, n = gap_closed(challenger, student, oracle, "ood_accuracy")
                print(f"  OOD: {method} closes {f:+.2f} [{lo:+.2f}, {hi:+.2f}] of the student-to-oracle gap (n {n})")
            except DataError as e:
                print(f"  OOD: no gap closed to report ({e})")
        for root, method in [(args.student, args.method)] + ([(Path(args.challenger[0]), args.challenger[1])]
                                                             if args.challenger else []):
            for figure, label, hint in (("hint_id", "ID, hint right", "right"), ("hint_id", "ID, hint wrong", "wrong"),
                                        ("hint_ood", "OOD (hint wrong)", None)):
                try:
                    chosen = of(root, method, families, hint)
                    print(f"  {method} {label}: hinted problems answered as the hint says {cell(chosen, figure)}")
                except DataError:
                    print(f"  {method} {label}: no hinted problem generated")


if __name__ == "__main__":
    main()
