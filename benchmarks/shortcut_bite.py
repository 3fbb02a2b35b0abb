"""How hard the planted shortcut bites a trained student: its held-out (OOD) accuracy and NLL on the
same problems with the hint as the data has it, with the hint removed, and with the hint at the right
answer. Paired problem by problem (iga.eval.scores.compare), so the differences come with their intervals.

    python benchmarks/shortcut_bite.py erm            # models/erm/adapter on data/split/ood.jsonl
    python benchmarks/shortcut_bite.py iga --rows 40

With `teacher.ood_cue: reversed` the data's hint states the wrong answer: "as generated" against
"removed" is what the shortcut costs out of domain; "removed" alone is `ood_cue: none`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iga.data.domains import DOMAINS  # noqa: E402
from iga.eval.evaluate import evaluate_student, for_evaluation  # noqa: E402
from iga.eval.scores import compare, estimate  # noqa: E402
from iga.hardware import describe, resolve_device  # noqa: E402
from iga.io import read_jsonl  # noqa: E402
from iga.params import load_params  # noqa: E402
from iga.train.student import load_trained  # noqa: E402


def variants(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows as generated, without their hint, and with the hint at the gold answer."""
    out: dict[str, list[dict]] = {"as generated": rows, "hint removed": [], "hint right": []}
    for r in rows:
        yes, no = DOMAINS[r["domain"]].cues
        bare = next((r["problem"][: -len(c) - 1] for c in (yes, no) if r["problem"].endswith(" " + c)), r["problem"])
        out["hint removed"].append(dict(r, problem=bare))
        right = {"yes": yes, "no": no}.get(r["answer"])
        out["hint right"].append(dict(r, problem=f"{bare} {right}" if right else bare))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method")
    ap.add_argument("--rows", type=int, default=0, help="the first N OOD rows (0: all)")
    args = ap.parse_args()
    params = load_params("params.yaml")
    torch.set_num_threads(params.eval.threads)
    device = resolve_device(params.train.device)
    model, tokenizer = load_trained("models/base", f"models/{args.method}/adapter", params.student.dtype)
    model = for_evaluation(model, params.eval.dtype, device)
    ood = read_jsonl("data/split/ood.jsonl")
    ood = ood[: args.rows] if args.rows else ood
    hinted = sum(r["problem"] != v["problem"] for r, v in zip(ood, variants(ood)["hint removed"]))
    print(f"{args.method}: {len(ood)} OOD problems of {len({r['seed_id'] for r in ood})} test seeds, {hinted} with a "
          f"hint; {describe(device)}")
    evaluations = {}
    for name, rows in variants(ood).items():
        ev = evaluate_student(model, tokenizer, [], rows, {}, params.domains.train, to_generate=None,
                              max_new_tokens=params.eval.max_new_tokens, batch_size=params.eval.batch_size,
                              nll_batch_size=params.eval.nll_batch_size,
                              lcs_groups=0, source="data/split/ood.jsonl")
        evaluations[name] = [ev]
        acc, nll = (estimate([ev], f) for f in ("ood_accuracy", "nll_ood"))
        print(f"  {name:13s} OOD accuracy {100 * acc[0]:5.1f} % [{100 * acc[1]:.1f}, {100 * acc[2]:.1f}]   "
              f"NLL {nll[0]:.3f} [{nll[1]:.3f}, {nll[2]:.3f}]")
    for name in ("hint removed", "hint right"):
        for figure, scale, unit in (("ood_accuracy", 100, " pp"), ("nll_ood", 1, "")):
            c = compare(evaluations["as generated"], evaluations[name], figure)
            print(f"  as generated − {name}: {c.describe(scale, unit, 1 if scale == 100 else 3)}")


if __name__ == "__main__":
    main()
