"""Supervised fine-tuning data: isomer groups → chat-formatted, completion-only, domain-major batches."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from iga.errors import DataError
from iga.params import TrainParams
from iga.train.distributed import World

SYSTEM_PROMPT = "Solve the problem step by step, one step per line, and end with 'Answer: <answer>'."
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: dict[str, Any] | None = None  # the data row (methods that read the text: VCD)


@dataclass
class Batch:
    """K isomer groups × N domains, rows domain-major: [domain 0 × K, domain 1 × K, …]."""
    input_ids: Tensor  # (N·K, T)
    attention_mask: Tensor
    labels: Tensor  # IGNORE on prompt and padding
    n_domains: int
    seed: int  # seeds the method's own randomness on this micro-batch (randomized SVD)
    sources: tuple[dict[str, Any], ...] | None = None  # each row's data row, where encoded with it

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.n_domains, self.seed, self.sources)


def prompt_text(tokenizer: Any, problem: str) -> str:
    """The student's input: the problem in its chat template, ready for the assistant turn."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tokenizer: Any, problem: str, target: str) -> Encoded:
    """Prompt + target + end-of-turn; labels only on the target (completion-only loss)."""
    prompt = tokenizer(prompt_text(tokenizer, problem), add_special_tokens=False)["input_ids"]
    completion = tokenizer(target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return Encoded(prompt + completion, [IGNORE] * len(prompt) + completion)


def encode_groups(tokenizer: Any, groups: list[list[dict[str, Any]]], max_length: int) -> tuple[list[list[Encoded]], int]:
    """Encoded groups whose every member fits in `max_length` tokens, and how many were too long.

    A group is dropped whole rather than truncated: a truncated CoT loses its answer line, and a
    group missing a member has no cross-domain variance to measure.
    """
    kept, too_long = [], 0
    for group in groups:
        encoded = [dataclasses.replace(encode(tokenizer, r["problem"], r["cot_solution"]), source=r) for r in group]
        if max(len(e.input_ids) for e in encoded) > max_length:
            too_long += 1
        else:
            kept.append(encoded)
    return kept, too_long


def isomer_groups(rows: list[dict[str, Any]], domains: tuple[str, ...], source: str) -> list[list[dict[str, Any]]]:
    """Rows grouped by `group_id`, each group ordered as `domains`; a group missing one is an error."""
    by_group: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_group[r["group_id"]][r["domain"]] = r
    groups = []
    for gid in sorted(by_group):
        missing = [d for d in domains if d not in by_group[gid]]
        if missing:
            raise DataError(f"{source}: isomer group {gid} has no instance in domain(s) {missing}")
        groups.append([by_group[gid][d] for d in domains])
    if not groups:
        raise DataError(f"{source}: no isomer groups")
    return groups


def collate(groups: list[list[Encoded]], pad_id: int, seed: int) -> Batch:
    """Pad on the right and lay rows out domain-major."""
    n_domains = len(groups[0])
    rows = [g[d] for d in range(n_domains) for g in groups]
    width = max(len(e.input_ids) for e in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, e in enumerate(rows):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    sources = tuple(e.source for e in rows) if all(e.source is not None for e in rows) else None
    return Batch(ids, mask, labels, n_domains, seed, sources)


class GroupSampler:
    """Which groups micro-batch j gets: epochs of seeded permutations, a pure function of (seed, j),
    so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n_groups: int, groups_per_batch: int, seed: int):
        if groups_per_batch > n_groups:
            raise DataError(f"train.groups_per_batch ({groups_per_batch}) exceeds the {n_groups} training groups")
        self.n, self.k, self.seed = n_groups, groups_per_batch, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return self._perms[epoch]

    def __call__(self, j: int) -> list[int]:
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(j * self.k, (j + 1) * self.k)]


def batcher(groups: list[list[Encoded]], tp: TrainParams, per_batch: int, pad_id: int, world: World = World()
            ) -> Callable[[int], list[Batch]]:
    """Step -> its micro-batches of `per_batch` groups each: a pure function of the step (resume-safe).
    Data-parallel, `per_batch` is the global micro-batch and each rank collates its equal share."""
    sampler = GroupSampler(len(groups), per_batch, tp.seed)
    world.shard(list(range(per_batch)))  # refuses a global batch that does not divide among the ranks

    def micro_batches(step: int) -> list[Batch]:
        return [collate([groups[i] for i in world.shard(sampler(j))], pad_id, seed=tp.seed * 1_000_003 + j)
                for j in range(step * tp.grad_accum, (step + 1) * tp.grad_accum)]

    return micro_batches
