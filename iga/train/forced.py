"""The teacher-forced pass: a batch's completion tokens scored under a model (`completion_logits`,
`completion_nll`: what training's loss, evaluation and selection all compute), and `teacher_forced`, the
one pass of evaluation and selection over (problem, target) rows with training's encoding and loss.
Evaluation reads each gold CoT's NLL and the hidden states LCS averages; the select stage reads each
candidate CoT's token ranks and NLL (the Rank-Surprisal Ratio, iga/rsr.py).

Rows of similar length are batched (right-padded), and the vocabulary projection runs only at the
positions that predict a completion token, not over the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iga.rsr import token_rank_nll
from iga.train.decode import Primed
from iga.train.pergrad import at_least_fp32
from iga.train.sft import IGNORE, Batch, collate, encode


class CompletionLogits(NamedTuple):
    """What a forward pass predicts of a batch's completions (`completion_logits`)."""
    logits: Tensor  # at each position that predicts a labelled token, row-major: (labelled tokens, vocabulary)
    targets: Tensor  # the labelled token each of them predicts
    rows: Tensor  # the batch row of each
    counts: Tensor  # labelled tokens per row
    hidden: tuple[Tensor, ...] | None  # every layer's hidden states, when asked


def completion_logits(model: nn.Module, batch: Batch, hidden_states: bool = False, cache: Any = None) -> CompletionLogits:
    """One forward pass whose vocabulary projection runs only at the positions that predict a labelled
    token (the completion), not over the whole prompt; `cache` (a transformers Cache) keeps its keys and values."""
    labels = batch.labels[:, 1:]
    labelled = labels != IGNORE
    keep = torch.cat([labelled, labelled.new_zeros(labelled.shape[0], 1)], dim=1)  # position t predicts token t + 1
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep,
                output_hidden_states=hidden_states, past_key_values=cache, use_cache=cache is not None)
    return CompletionLogits(out.logits, labels[labelled], labelled.nonzero()[:, 0], labelled.sum(dim=1),
                      out.hidden_states if hidden_states else None)


def completion_nll(c: CompletionLogits, weights: Tensor | None = None) -> Tensor:
    """Per-row sum of the completion tokens' next-token losses; `weights` (one per labelled token, in
    row-major order) scale each token's loss (VCD)."""
    loss = F.cross_entropy(at_least_fp32(c.logits), c.targets, reduction="none")  # (labelled tokens,)
    if weights is not None:
        loss = loss * weights
    return torch.zeros(c.counts.shape[0], dtype=loss.dtype, device=loss.device).index_add(0, c.rows, loss)


@dataclass(frozen=True)
class Forced:
    nll: float  # summed over the completion tokens, nats
    tokens: int  # completion tokens (the target and its end-of-turn token)
    rank: float | None = None  # summed clipped token ranks (iga.rsr), where asked
    states: dict[int, Tensor] | None = None  # hidden states averaged over the row's tokens from `skip` on, where asked
    primed: Primed | None = None  # the prompt's states, to decode from (iga.train.decode), where asked


@torch.no_grad()
def teacher_forced(model: Any, tokenizer: Any, rows: list[tuple[str, str]], batch_size: int, *,
                   rank_clip: int | None = None, layers: Iterable[int] = (), skip: list[int | None] | None = None,
                   prime: Collection[int] = (), on_batch: Callable[[int], None] = lambda n: None) -> list[Forced]:
    """Each (problem, target) row's completion NLL; with `rank_clip`, its summed token ranks clipped there;
    where `skip[i]` is not None, its hidden states at `layers` averaged over its tokens from position
    `skip[i]` on (LCS); for the rows `prime` names, its prompt's states and greedy first token, from which
    decoding goes on without encoding the prompt again (~46 KB per prompt token for SmolLM2-135M in fp32,
    held until the caller lets them go)."""
    layers = sorted(set(layers))
    skip = skip or [None] * len(rows)
    encoded = [encode(tokenizer, problem, target) for problem, target in rows]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i].input_ids), reverse=True)
    out: list[Forced | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([[encoded[i]] for i in idx], tokenizer.pad_token_id, seed=0).to(device)
            want = bool(layers) and any(skip[i] is not None for i in idx)
            cache = None
            if any(i in prime for i in idx):
                from transformers import DynamicCache  # not imported with the training code, which needs no cache

                cache = DynamicCache()
            c = completion_logits(model, batch, hidden_states=want, cache=cache)
            sums = completion_nll(c)
            first = torch.cumsum(c.counts, 0) - c.counts  # each row's first labelled position in c.logits
            ranks = None
            if rank_clip is not None:
                token_ranks, _ = token_rank_nll(c.logits, c.targets, rank_clip)
                ranks = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add(0, c.rows,
                                                                                         token_ranks.double())
            for j, i in enumerate(idx):
                states = None
                if want and skip[i] is not None:
                    span = slice(skip[i], len(encoded[i].input_ids))  # right padding: the row's own tokens
                    states = {layer: c.hidden[layer][j, span].float().mean(dim=0) for layer in layers}
                primed = None
                if cache is not None and i in prime:
                    n = len(encoded[i].input_ids) - int(c.counts[j])  # the prompt: every token before the completion
                    primed = Primed(tuple(layer.keys[j, :, :n].clone() for layer in cache.layers),
                                    tuple(layer.values[j, :, :n].clone() for layer in cache.layers),
                                    int(c.logits[first[j]].argmax()))
                out[i] = Forced(float(sums[j]), int(c.counts[j]), None if ranks is None else float(ranks[j]), states,
                                primed)
            on_batch(len(idx))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]

