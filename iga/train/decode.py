"""Greedy decoding for evaluation (whole completions) and for training methods that read the
student's own next line (validity-calibrated distillation)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def greedy(model: Any, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, eos_id: int,
           stop_ids: frozenset[int] = frozenset()) -> list[list[int]]:
    """Greedy decoding with the KV cache, where a finished row leaves the batch and the cache. A row
    finishes at `eos_id` (not kept) or after a token of `stop_ids` (kept: e.g. the end of a line).

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
        if stop_ids:
            going &= torch.tensor([t not in stop_ids for t in token.tolist()], device=going.device)
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
