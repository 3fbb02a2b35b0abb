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

from iga.data.domains import without_hint
from iga.errors import DataError
from iga.params import DomainsParams, RunConfig
from iga.train.sft import isomer_groups

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
    if run.data in ("isomers", "no_hints"):  # no_hints: rows already as the run sees them (`as_seen`)
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


def as_seen(rows: list[Row], run: RunConfig) -> list[Row]:
    """The rows as `run` reads them, in training, validation and evaluation alike: for data no_hints (the
    no-hint oracle) every problem without its planted hint; for every other run as they are."""
    if run.data != "no_hints":
        return rows
    return [{**r, "problem": without_hint(r["problem"], r["domain"])} for r in rows]


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


def evaluation_sets(seed_level: dict[str, list[Row]], parts: dict[str, list[Row]], unit: str, eval_groups: int,
                    domains: DomainsParams, source: str) -> tuple[list[Row], list[Row], set[tuple[str, str]], list[Row]]:
    """A run's held-out ID and OOD rows (NLL on all of them), the keys of those it generates, and the
    rows LCS is measured on. `seed_level` is the seed-level split, `parts` the run's own (`unit`).
    Generated: the first `eval_groups` test seeds' rows, or as many rows in a fixed order for an
    instance-level split. LCS: the seed-level held-out groups, for every run (an instance-level split
    has few complete test groups, and every run's LCS is comparable this way)."""
    lcs_rows = complete_groups(seed_level["test"], domains.train)
    key = lambda r: (r["group_id"], r["domain"])  # noqa: E731
    if unit == "seed":
        test, ood = seed_level["test"], seed_level["ood"]
        chosen = held_out(test, ood, eval_groups, source)
    else:
        test, ood = parts["test"], parts["ood"]
        first = lambda rows, n: sorted(rows, key=lambda r: (r["seed_id"], r["domain"]))[:n]  # noqa: E731
        chosen = (first(test, eval_groups * len(domains.train)), first(ood, eval_groups * len(domains.ood)))
    return test, ood, {key(r) for rows in chosen for r in rows}, lcs_rows
