"""Evaluation of a student (paper App. B and D): greedy-decoded accuracy and the Logical Consistency Score.

Accuracy: the final `Answer:` line of a greedy completion, exact match after normalisation.
LCS: for each held-out isomer group, the trace of the covariance of its domain variants'
token-averaged hidden states; low LCS = the student represents the isomers alike.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from iga.answers import extract_answer, normalize_answer
from iga.errors import DataError
from iga.report import DEPTHS
from iga.sft import encode, isomer_groups, prompt_text


def depth_layers(n_layers: int) -> dict[str, int]:
    """Index into `hidden_states` (0 = embeddings, i = output of block i) for each named depth."""
    return {"quarter": n_layers // 4, "half": n_layers // 2, "three_quarters": 3 * n_layers // 4,
            "penultimate": n_layers - 1}


@torch.no_grad()
def generate(model: Any, tokenizer: Any, problems: list[str], max_new_tokens: int, batch_size: int,
             on_batch: Callable[[int], None] = lambda n: None) -> list[str]:
    """Greedy completions, in batches of similar prompt length (left-padded)."""
    prompts = [prompt_text(tokenizer, p) for p in problems]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    out: list[str] = [""] * len(prompts)
    model.eval()
    tokenizer.padding_side = "left"  # every row's next token follows its last position
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        rows = greedy(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), max_new_tokens,
                      tokenizer.eos_token_id)
        for i, ids in zip(idx, rows):
            out[i] = tokenizer.decode(ids, skip_special_tokens=True)
        on_batch(len(idx))
    return out


@torch.no_grad()
def greedy(model: Any, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding with the KV cache, where a finished row leaves the batch and the cache.

    `model.generate` keeps decoding finished rows until the longest one ends; with a few completions
    that never stop, a batch then costs max_new_tokens x its size. Here it costs what it generates.
    """
    from transformers import DynamicCache

    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    live = torch.arange(input_ids.shape[0])
    cache = DynamicCache()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        going = token != eos_id
        for row, t in zip(live[going].tolist(), token[going].tolist()):
            out[row].append(t)
        if step + 1 == max_new_tokens or not going.any():
            break
        if not going.all():
            cache.batch_select_indices(going.nonzero().squeeze(1))
            live, token, attention_mask = live[going], token[going], attention_mask[going]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask,
                       position_ids=attention_mask.sum(-1, keepdim=True) - 1, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    return out


def score(rows: list[dict[str, Any]], completions: list[str]) -> list[bool]:
    """Exact match of each completion's extracted answer with the row's gold answer."""
    return [(pred := extract_answer(c)) is not None and pred == normalize_answer(str(r["answer"]))
            for r, c in zip(rows, completions)]


def accuracy_report(id_rows: list[dict[str, Any]], id_hits: list[bool], ood_rows: list[dict[str, Any]],
                    ood_hits: list[bool]) -> dict[str, Any]:
    """ID and OOD accuracy, Δ-Gap = ID − OOD, and accuracy per domain."""
    if not id_rows or not ood_rows:
        raise DataError(f"an empty evaluation set: {len(id_rows)} ID rows and {len(ood_rows)} OOD rows")
    by_domain: dict[str, list[bool]] = defaultdict(list)
    for r, hit in zip(id_rows + ood_rows, id_hits + ood_hits):
        by_domain[r["domain"]].append(hit)
    id_acc, ood_acc = statistics.fmean(id_hits), statistics.fmean(ood_hits)
    return {"id_accuracy": id_acc, "ood_accuracy": ood_acc, "delta_gap": id_acc - ood_acc,
            "n_id": len(id_rows), "n_ood": len(ood_rows),
            "domain_accuracy": {d: statistics.fmean(h) for d, h in by_domain.items()}}  # ID domains, then OOD


def trace_cov(states: Tensor) -> float:
    """Trace of the N-sample covariance of N vectors: mean squared distance to their mean."""
    centred = states - states.mean(dim=0, keepdim=True)
    return float(centred.pow(2).sum(dim=1).mean())


@torch.no_grad()
def group_states(model: Any, tokenizer: Any, group: list[dict[str, Any]], layers: Iterable[int]) -> dict[int, Tensor]:
    """Each variant's hidden states at `layers`, averaged over its own tokens.

    The chat template and system prompt open every variant alike, and a causal model's states
    there are identical across the group, so the shared token prefix is left out of the average.
    """
    seqs = [encode(tokenizer, r["problem"], r["cot_solution"]).input_ids for r in group]
    shared = 0
    while all(len(s) > shared + 1 for s in seqs) and len({s[shared] for s in seqs}) == 1:
        shared += 1
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    own = mask.clone()
    own[:, :shared] = 0
    weights = (own / own.sum(dim=1, keepdim=True)).unsqueeze(-1).float()
    return {layer: (hidden[layer].float() * weights).sum(dim=1) for layer in layers}


def lcs(model: Any, tokenizer: Any, rows: list[dict[str, Any]], domains: tuple[str, ...], max_groups: int,
        source: str, on_group: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """LCS at four depths, raw and on L2-normalised states, over up to `max_groups` held-out groups."""
    groups = isomer_groups(rows, domains, source)[:max_groups]
    n_layers = model.config.num_hidden_layers
    layers = depth_layers(n_layers)
    raw: dict[str, list[float]] = defaultdict(list)
    normed: dict[str, list[float]] = defaultdict(list)
    model.eval()
    for group in groups:
        states = group_states(model, tokenizer, group, set(layers.values()))
        for name, layer in layers.items():
            h = states[layer]
            raw[name].append(trace_cov(h))
            normed[name].append(trace_cov(torch.nn.functional.normalize(h, dim=1)))
        on_group(1)
    return {"lcs": {name: {"layer": layers[name], "raw": statistics.fmean(raw[name]),
                           "normalized": statistics.fmean(normed[name])} for name in DEPTHS},
            "lcs_groups": len(groups)}
