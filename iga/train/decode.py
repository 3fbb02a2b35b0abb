"""Greedy decoding, the one generation path: evaluation's whole completions and validity-calibrated
distillation's next lines (the student's own line under a gold prefix).

The batch holds `batch_size` rows with their KV cache (iga.train.kvcache): a row that finishes leaves
its slot to the next prompt, so the batch stays full until the prompts run out (a few completions that
never end no longer hold a batch of finished rows behind them), and a row stops as soon as what it could
still generate cannot change what is read from it (`Stop`): its first line (VCD), a complete `Answer:`
line, or a line that runs on. Tokens generated after that point cost time and change no score
(docs/measured.md: what the rule cut from the demo's completions, and that it changed none of their scores).
A prompt whose states another pass already computed (`Primed`: evaluation's teacher-forced pass reads every
held-out prompt on its way to the gold CoT) starts from them instead of being encoded again.
"""
from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from iga.data.answers import ANSWER_LINE

# transformers' switch for SDPA's grouped-query attention when a mask is given (transformers.integrations.
# sdpa_attention.use_gqa_in_sdpa); without it every layer copies its K/V heads once per query head it serves
GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextmanager
def shared_kv_heads() -> Iterator[None]:
    """Attention reads each key/value head where the query heads sharing it are (SDPA's enable_gqa) instead of
    from a copy per query head, made at every step in every layer: the same kernel and the same sums, so the
    same tokens (measured on the demo's students: logits and completions bit-identical, decoding 9-12 % faster
    on 2 Zen 4 cores, docs/measured.md). Only around inference: training's backward pass would sum the shared
    heads' gradients in another order."""
    before = os.environ.get(GQA_SWITCH)
    os.environ[GQA_SWITCH] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[GQA_SWITCH]
        else:
            os.environ[GQA_SWITCH] = before


@dataclass(frozen=True)
class Stop:
    """When a row stops before its end-of-turn token or the token budget.

    lines: after this many line ends (VCD's next line: 1).
    answer: once a line that states the answer (`Answer: X`) is complete. Evaluation reads the last such
        line: the rule holds where a completion does not go on to answer again otherwise.
    line_tokens: once its current line runs past this many tokens (a line that repeats a phrase).
    Repeated lines are not a stop: the demo's students often repeat a step, up to 19 times, and then answer
    (docs/measured.md). The evaluation's rule and its limits come from the training data
    (iga.eval.evaluate.decoding).
    """
    lines: int | None = None
    answer: bool = False
    line_tokens: int | None = None

    def reason(self, text: str) -> str | None:
        """Why a row whose generated text so far is `text`, having just ended a line, stops now (None: it
        goes on). The long-line rule is checked token by token (`Watch`), not here."""
        ends = text.count("\n")
        if self.lines is not None and ends >= self.lines:
            return "line"
        if self.answer and any(ANSWER_LINE.match(line) for line in text.split("\n")[:ends]):
            return "answer"
        return None


@dataclass(frozen=True)
class Primed:
    """A prompt as a forward pass over it left it: each layer's keys and values at its positions, (heads,
    prompt tokens, dim), and the greedy first token (the argmax at its last position)."""
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    first: int

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[1]


SLACK = 32  # dead cache positions before every row's start that are moved out (kvcache.Slots.shift)


@dataclass(frozen=True)
class Completion:
    text: str
    ids: tuple[int, ...]  # generated tokens, end-of-turn excluded
    stop: str  # eos | budget | line | answer | long_line

    @property
    def tokens(self) -> int:
        return len(self.ids)


def line_end_ids(tokenizer: Any) -> frozenset[int]:
    """Vocabulary entries that contain a newline: the tokens after which a row's lines are checked."""
    vocab = tokenizer.get_vocab()
    return frozenset(i for i in vocab.values() if "\n" in tokenizer.decode([i]))


class Watch:
    """`Stop` applied to the rows of one batch as their tokens arrive: a row's lines are decoded and checked
    only when it ends one; its current line's length is counted at every token."""

    def __init__(self, stop: Stop, tokenizer: Any, line_ends: frozenset[int], rows: int):
        self.stop, self.tokenizer, self.line_ends = stop, tokenizer, line_ends
        self.line = [0] * rows  # tokens in each row's current line

    def __call__(self, row: int, ids: list[int]) -> str | None:
        """Why `row`, whose generated tokens are now `ids`, stops after the last of them (None: it goes on)."""
        if ids[-1] not in self.line_ends:
            self.line[row] += 1
            limit = self.stop.line_tokens
            return "long_line" if limit is not None and self.line[row] > limit else None
        self.line[row] = 0
        return self.stop.reason(self.tokenizer.decode(ids, skip_special_tokens=True))


@torch.no_grad()
def greedy(model: Any, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int, batch_size: int,
           stopped: Callable[[int, list[int]], str | None] = lambda row, ids: None,
           on_done: Callable[[int], None] = lambda row: None,
           primed: Mapping[int, Primed] | None = None) -> list[tuple[list[int], str]]:
    """Greedy decoding of every prompt (token ids), `batch_size` rows at a time with the KV cache: a row
    finishes at `eos_id` (not kept), after `max_new_tokens`, or when `stopped(row, its tokens so far)` gives
    a reason; its slot then takes the next prompt, so the batch stays full until the prompts run out, when
    finished rows leave it. Prompt `i` in `primed` joins with its states, not encoded again. Returns each
    prompt's tokens and why it finished, in the order given.

    `model.generate` keeps decoding finished rows until the longest one ends; with a few completions that
    never stop, a batch then costs max_new_tokens x its size. Here it costs what it generates.
    """
    from transformers import DynamicCache

    from iga.train.kvcache import Slots  # transformers: imported when decoding, not with the training code

    primed = primed or {}
    out: list[list[int]] = [[] for _ in prompts]
    why = ["budget"] * len(prompts)
    device = next(model.parameters()).device
    pending = deque(range(len(prompts)))
    # the longest prompt from each one on: the room a shift must leave for whatever joins later
    room_from = list(accumulate(map(len, reversed(prompts)), max))[::-1]
    longest = room_from[0]
    cache = Slots(model.config.num_hidden_layers, min(batch_size, len(prompts)), longest + max_new_tokens + SLACK)
    cache.start(longest)
    rows = [-1] * cache.slots  # the prompt each slot decodes
    token = torch.zeros(cache.slots, dtype=torch.long, device=device)  # each slot's newest token, not yet taken
    mask = torch.zeros(cache.slots, cache.capacity, dtype=torch.long, device=device)  # the positions a slot reads

    def admit(slots: list[int]) -> list[int]:
        """The next prompts into `slots`, each with its first token; returns the slots filled."""
        take = [pending.popleft() for _ in range(min(len(slots), len(pending)))]
        encode = [r for r in take if r not in primed]
        states = {r: primed[r] for r in take if r in primed}
        if encode:  # one forward pass over the prompts that come without their states, left-padded together
            lengths = torch.tensor([len(prompts[r]) for r in encode], device=device)
            width = int(lengths.max())
            ids = torch.tensor([[pad_id] * (width - len(prompts[r])) + prompts[r] for r in encode], device=device)
            part = (torch.arange(width, device=device) >= width - lengths[:, None]).long()  # left padding
            own = DynamicCache()
            logits = model(input_ids=ids, attention_mask=part, position_ids=(part.cumsum(-1) - 1).clamp(min=0),
                           past_key_values=own, use_cache=True, logits_to_keep=1).logits[:, -1]
            firsts = logits.argmax(-1).tolist()
            states |= {r: Primed(tuple(layer.keys[j, :, -len(prompts[r]):] for layer in own.layers),
                                 tuple(layer.values[j, :, -len(prompts[r]):] for layer in own.layers), firsts[j])
                       for j, r in enumerate(encode)}
        end = cache.length
        for slot, r in zip(slots, take):
            state = states[r]
            if state.tokens != len(prompts[r]):
                raise ValueError(f"prompt {r}: primed with {state.tokens} tokens' states, but it has {len(prompts[r])}")
            cache.place(slot, state.keys, state.values)
            mask[slot] = 0
            mask[slot, end - len(prompts[r]):end] = 1
            rows[slot], token[slot] = r, state.first
        return slots[:len(take)]

    def taken(slot: int) -> bool:
        """The slot's newest token taken into its row's completion; True when the row is finished."""
        r, t = rows[slot], int(token[slot])
        if t == eos_id:
            why[r] = "eos"
        else:
            out[r].append(t)
            why[r] = stopped(r, out[r]) or why[r]
        finished = why[r] != "budget" or len(out[r]) == max_new_tokens
        if finished:
            on_done(r)
        return finished

    fresh = admit(list(range(cache.slots)))
    while True:
        done = [slot for slot in fresh if taken(slot)]
        if done:
            filled = admit(done)
            gone = done[len(filled):]  # no prompt left for these slots: they leave the batch
            if gone:
                keep = [slot for slot in range(len(rows)) if slot not in gone]
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(index)
                rows, token, mask = [rows[slot] for slot in keep], token[index], mask[index]
                filled = [keep.index(slot) for slot in filled]
            if filled:
                fresh = filled  # their first tokens are taken before the batch decodes on
                continue
        if not rows:
            return list(zip(out, why))
        # Attention reads every row's cache up to `length`: once SLACK positions before every row's start are
        # dead (keeping room for the longest prompt still to join), all move back together.
        room = room_from[pending[0]] if pending else 0
        dead = min(int(mask[:, :cache.length].argmax(-1).min()), cache.length - room)
        if dead >= SLACK:
            cache.shift(dead)
            mask[:, :cache.capacity - dead] = mask[:, dead:].clone()
            mask[:, cache.capacity - dead:] = 0
        mask[:, cache.length] = 1
        reads = mask[:, :cache.length + 1]
        token = model(input_ids=token[:, None], attention_mask=reads, position_ids=reads.sum(-1, keepdim=True) - 1,
                      past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
        fresh = list(range(len(rows)))


def generate(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int, batch_size: int, stop: Stop,
             on_done: Callable[[int], None] = lambda n: None,
             primed: Mapping[int, Primed] | None = None) -> list[Completion]:
    """Greedy completions of `texts` (prompts already in the chat template), in their order; text `i` in
    `primed` starts from those states. Decoded longest prompt first: the prompts that join the batch together
    are padded to the longest of them. `on_done(1)` as each finishes."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    prompts = [encoded[i] for i in order]
    primed = primed or {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with shared_kv_heads():
            rows = greedy(model, prompts, max_new_tokens, tokenizer.eos_token_id, pad, batch_size,
                          Watch(stop, tokenizer, line_end_ids(tokenizer), len(prompts)), lambda row: on_done(1),
                          {row: primed[i] for row, i in enumerate(order) if i in primed})
    finally:
        model.train(was_training)
    out: list[Completion | None] = [None] * len(texts)
    for i, (ids, why) in zip(order, rows):
        out[i] = Completion(tokenizer.decode(ids, skip_special_tokens=True), tuple(ids), why)
    return out  # type: ignore[return-value]
