"""The seed-level split (paper §3.3): no instance of a training seed reaches the test side."""
from __future__ import annotations

import hashlib
from typing import Any

from iga.errors import DataError
from iga.params import DomainsParams, SplitParams

LEAKAGE_WARNING = ("split.unit is 'instance': instances of one seed land on both sides. This exists only to "
                   "reproduce the paper's leakage ablation; its test scores are inflated and must not be reported.")


def side(key: str, split_seed: int, test_fraction: float) -> str:
    """'train' or 'test' from a hash of (key, split.seed) alone.

    A seed's side never depends on which other seeds exist, so a growing seed bank never moves a
    test seed into training on a later run.
    """
    digest = hashlib.sha256(f"{split_seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "train"


def split(accepted: list[dict[str, Any]], sp: SplitParams, domains: DomainsParams
          ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """{'train', 'test', 'ood'} rows and metrics. test: test seeds in training domains; ood: held-out domains."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "test": [], "ood": []}
    for row in accepted:
        key = row["seed_id"] if sp.unit == "seed" else f"{row['group_id']}|{row['domain']}"
        s = side(key, sp.seed, sp.test_fraction)
        if row["domain"] in domains.train:
            out[s].append(row)
        elif s == "test":
            out["ood"].append(row)
    train_seeds = {r["seed_id"] for r in out["train"]}
    test_seeds = {r["seed_id"] for r in out["test"] + out["ood"]}
    overlap = sorted(train_seeds & test_seeds)
    if sp.unit == "seed" and overlap:
        raise DataError(f"seed-level split leaked {len(overlap)} seeds into both sides, e.g. {overlap[:5]}")
    metrics = {
        "unit": sp.unit, "leakage": bool(overlap), "seeds_in_both_sides": len(overlap),
        "seeds_train": len(train_seeds), "seeds_test": len(test_seeds),
        "test_fraction_requested": sp.test_fraction,
        "test_fraction_realized": round(len(test_seeds) / max(1, len(train_seeds | test_seeds)), 4),
        "rows": {k: len(v) for k, v in out.items()},
    }
    return out, metrics
