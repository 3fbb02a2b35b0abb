"""The experiment's data variants (paper App. B.3 and Table 2) and its held-out subsets.

A run trains on *units*: lists of rows that go into a micro-batch together, domain-major. An
isomer group is a unit of N rows; a single instance is a unit of one. Every run sees the same
number of sequences per micro-batch, so methods and ablations differ in what they learn from, not
in how much.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from iga.errors import DataError
from iga.params import RunConfig
from iga.sft import isomer_groups

# LoRA-SFT's simple augmentation: each seed problem also appears under three other instruction phrasings.
PHRASINGS = ("{}", "Question: {}", "Solve the following problem. {}", "Work through this carefully: {}")

Row = dict[str, Any]


def run_domains(run: RunConfig, train_domains: tuple[str, ...]) -> tuple[str, ...]:
    return run.domains or train_domains


def train_units(rows: list[Row], run: RunConfig, train_domains: tuple[str, ...], seed: int, source: str
                ) -> list[list[Row]]:
    """The run's training units from the split's training rows (complete isomer groups only)."""
    domains = run_domains(run, train_domains)
    groups = isomer_groups(rows, train_domains, source)
    keep = [train_domains.index(d) for d in domains]
    groups = [[g[i] for i in keep] for g in groups]
    if run.data == "isomers":
        return groups
    if run.data == "random_pairing":  # each domain's column permuted on its own: same rows, no isomorphism
        rng = random.Random(seed)
        columns = [[g[i] for g in groups] for i in range(len(domains))]
        for column in columns[1:]:
            rng.shuffle(column)
        return [list(unit) for unit in zip(*columns)]
    if run.data == "shuffled":  # CoT-Distill: the same instances, no group structure
        return [[row] for g in groups for row in g]
    if run.data == "seed_only":  # LoRA-SFT: one domain's instance of each seed, plus rephrasings
        return [[{**g[0], "problem": phrasing.format(g[0]["problem"])}] for g in groups for phrasing in PHRASINGS]
    raise ValueError(f"unknown data variant {run.data!r}")


def held_out(test: list[Row], ood: list[Row], n_groups: int, source: str) -> tuple[list[Row], list[Row]]:
    """The first `n_groups` test seeds' ID and OOD rows (the same subset for every run of one split)."""
    seeds = sorted({r["seed_id"] for r in test})[:n_groups]
    if not seeds:
        raise DataError(f"{source}: no test rows to evaluate on")
    chosen = set(seeds)
    return [r for r in test if r["seed_id"] in chosen], [r for r in ood if r["seed_id"] in chosen]


def complete_groups(rows: list[Row], domains: tuple[str, ...]) -> list[Row]:
    """The rows of groups that have every domain (an instance-level split breaks some groups up)."""
    by_group: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        by_group[r["group_id"]].add(r["domain"])
    whole = {g for g, ds in by_group.items() if set(domains) <= ds}
    return [r for r in rows if r["group_id"] in whole]
