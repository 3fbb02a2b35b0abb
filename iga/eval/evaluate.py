"""Evaluation of a student (paper App. B and D): greedy-decoded accuracy, the teacher-forced NLL of
the gold solutions, and the Logical Consistency Score.

Accuracy: the final `Answer:` line of a greedy completion, exact match after normalisation.
NLL: the mean per-token negative log-likelihood of a problem's gold CoT + answer given its prompt,
with training's own encoding, masking and loss: a continuous, paired score that needs no generation.
LCS: for each held-out isomer group, the trace of the covariance of its domain variants'
token-averaged hidden states; low LCS = the student represents the isomers alike. NLL and LCS come
from the same teacher-forced pass.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from iga.data.answers import extract_answer, normalize_answer
from iga.eval.external import extract_prediction, is_correct, load_benchmark
from iga.eval.scores import DEPTHS, score_records
from iga.hardware import describe, resolve_device, resolve_precision
from iga.params import Params
from iga.train.decode import greedy
from iga.train.methods import forward_losses
from iga.train.sft import collate, encode, isomer_groups, prompt_text
from iga.train.student import load_trained


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


def score(rows: list[dict[str, Any]], completions: list[str]) -> list[bool]:
    """Exact match of each completion's extracted answer with the row's gold answer."""
    return [(pred := extract_answer(c)) is not None and pred == normalize_answer(str(r["answer"]))
            for r, c in zip(rows, completions)]


@torch.no_grad()
def teacher_forced(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int,
                   layers: Iterable[int] = (), skip: list[int | None] | None = None,
                   on_batch: Callable[[int], None] = lambda n: None
                   ) -> tuple[list[tuple[float, int]], list[dict[int, Tensor] | None]]:
    """One forward pass per batch (rows of similar length) over each row's prompt + gold CoT, with
    training's encoding and loss (`encode`, `forward_losses`): each row's completion NLL (sum over
    its tokens, their count) and, where `skip[i]` is not None, its hidden states at `layers`
    averaged over its tokens from position `skip[i]` on (LCS)."""
    layers = sorted(set(layers))
    skip = skip or [None] * len(rows)
    encoded = [encode(tokenizer, r["problem"], r["cot_solution"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i].input_ids), reverse=True)
    nll: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    states: list[dict[int, Tensor] | None] = [None] * len(rows)
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([[encoded[i]] for i in idx], tokenizer.pad_token_id, seed=0).to(device)
        want = bool(layers) and any(skip[i] is not None for i in idx)
        sums, counts, hidden = forward_losses(model, batch, hidden_states=want)
        for j, i in enumerate(idx):
            nll[i] = (float(sums[j]), int(counts[j]))
            if want and skip[i] is not None:
                span = slice(skip[i], len(encoded[i].input_ids))  # right padding: the row's own tokens
                states[i] = {layer: hidden[layer][j, span].float().mean(dim=0) for layer in layers}
        on_batch(len(idx))
    return nll, states


def shared_prefix(seqs: list[list[int]]) -> int:
    """Tokens every sequence of an isomer group opens with (chat template, system prompt): a causal
    model's states there are identical across the group, so LCS leaves them out."""
    shared = 0
    while all(len(s) > shared + 1 for s in seqs) and len({s[shared] for s in seqs}) == 1:
        shared += 1
    return shared


def trace_cov(states: Tensor) -> float:
    """Trace of the N-sample covariance of N vectors: mean squared distance to their mean."""
    centred = states - states.mean(dim=0, keepdim=True)
    return float(centred.pow(2).sum(dim=1).mean())


def lcs_record(group: list[dict[str, Any]], states: list[dict[int, Tensor]], layers: dict[str, int]) -> dict[str, Any]:
    """One isomer group's LCS at each depth, raw and on L2-normalised states."""
    record: dict[str, Any] = {"group_id": group[0]["group_id"], "seed_id": group[0]["seed_id"]}
    for name in DEPTHS:
        h = torch.stack([s[layers[name]] for s in states])
        record[name] = {"raw": trace_cov(h), "normalized": trace_cov(torch.nn.functional.normalize(h, dim=1))}
    return record


Progress = Callable[[str, int], Callable[[int], None]]  # (what, total) -> advance by n


def for_evaluation(model: Any, dtype: str, device: torch.device) -> Any:
    """A trained student as every evaluation runs it: the LoRA merged in (the same function, no LoRA
    branch to run at every decoding step), in `eval.dtype` (auto: bf16 where native) on `device`."""
    return model.merge_and_unload().to(device, getattr(torch, resolve_precision(dtype, device)))


def evaluate_student(model: Any, tokenizer: Any, test: list[dict[str, Any]], ood: list[dict[str, Any]],
                     external: dict[str, list[dict[str, Any]]], train_domains: tuple[str, ...], *,
                     to_generate: set[tuple[str, str]] | None, max_new_tokens: int, batch_size: int,
                     nll_batch_size: int, lcs_groups: int, source: str, lcs_rows: list[dict[str, Any]] | None = None,
                     progress: Progress = lambda what, total: lambda n: None) -> dict[str, Any]:
    """Score a (merged) student on the held-out sets: NLL of every test and OOD row, greedy accuracy of
    the rows whose (group_id, domain) is in `to_generate` (None: every row) and of every external
    problem, and LCS over the
    first `lcs_groups` isomer groups of `lcs_rows` (default: the test rows). Returns the evaluation
    (`scores`, `lcs`; iga.eval.scores), the LCS layers and one completion record per generated problem."""
    held_out = {"test": test, "ood": ood}
    key = lambda r: (r["group_id"], r["domain"])  # noqa: E731
    chosen = {name: [r for r in rows if to_generate is None or key(r) in to_generate]
              for name, rows in held_out.items()} | external
    problems = [r["problem"] for rows in chosen.values() for r in rows]
    flat = iter(generate(model, tokenizer, problems, max_new_tokens, batch_size,
                         on_batch=progress("generating", len(problems))))
    done = {name: [next(flat) for _ in rows] for name, rows in chosen.items()}  # one call: fuller batches

    # NLL of every held-out row and the LCS states of the chosen groups, from one teacher-forced pass
    layers = depth_layers(model.config.num_hidden_layers)
    groups = isomer_groups(test if lcs_rows is None else lcs_rows, train_domains, source)[:lcs_groups] \
        if lcs_groups else []
    skip = {key(r): shared_prefix(seqs) for g in groups
            for seqs in [[encode(tokenizer, x["problem"], x["cot_solution"]).input_ids for x in g]] for r in g}
    rows = test + ood
    rows += [r for g in groups for r in g if key(r) not in {key(x) for x in rows}]
    nll, states = teacher_forced(model, tokenizer, rows, nll_batch_size, layers.values(), [skip.get(key(r)) for r in rows],
                                 on_batch=progress("NLL and LCS", len(rows)))
    by_key = {key(r): i for i, r in enumerate(rows)}

    scores, completions = [], []
    for name, part in held_out.items():
        correct = {key(r): hit for r, hit in zip(chosen[name], score(chosen[name], done[name]))}
        scores += score_records(name, part, [correct.get(key(r)) for r in part], [nll[by_key[key(r)]] for r in part])
        completions += [{"set": name, "id": f"{r['group_id']}/{r['domain']}", "gold": r["answer"],
                         "predicted": extract_answer(c), "completion": c} for r, c in zip(chosen[name], done[name])]
    for name, part in external.items():
        preds = [extract_prediction(name, c) for c in done[name]]
        scores += score_records(name, part, [is_correct(name, p, r["answer"]) for p, r in zip(preds, part)])
        completions += [{"set": name, "id": r["id"], "gold": r["answer"], "predicted": p, "completion": c}
                        for r, p, c in zip(part, preds, done[name])]
    consistency = [lcs_record(g, [states[by_key[key(r)]] for r in g], layers) for g in groups]
    return {"scores": scores, "lcs": consistency, "lcs_layers": layers, "completions": completions}


def score_adapter(params: Params, base: Path, adapter: Path, test: list[dict[str, Any]], ood: list[dict[str, Any]],
                  source: str, name: str) -> dict[str, Any]:
    """The lifecycle's evaluation of one adapter: `base` with `adapter` merged in, on every test and OOD
    row and the configured external benchmarks (`eval`), with a progress bar per phase named `name`."""
    ev = params.eval
    torch.set_num_threads(ev.threads)
    device = resolve_device(params.train.device)
    model, tokenizer = load_trained(base, adapter, params.student.dtype)
    model = for_evaluation(model, ev.dtype, device)
    with ExitStack() as bars:  # a progress bar per phase, each closed at the end
        evaluation = evaluate_student(
            model, tokenizer, test, ood, {b: load_benchmark(b, e.limit) for b, e in ev.external.items() if e.limit},
            params.domains.train, to_generate=None, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
            nll_batch_size=ev.nll_batch_size, lcs_groups=ev.lcs_groups, source=source,
            progress=lambda what, total: bars.enter_context(tqdm(total=total, desc=f"{name}: {what}")).update)
    return evaluation | {"device": describe(device), "dtype": resolve_precision(ev.dtype, device)}
