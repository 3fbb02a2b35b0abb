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

import dataclasses
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from tqdm import tqdm

from iga.data.answers import extract_answer, normalize_answer
from iga.data.domains import stated_hint
from iga.eval.external import extract_prediction, is_correct, load_benchmark
from iga.eval.scores import DEPTHS, score_records
from iga.hardware import describe, resolve_device, resolve_precision
from iga.params import Budget, Params
from iga.train import decode
from iga.train.decode import Completion, Primed, Stop
from iga.train.forced import teacher_forced
from iga.train.sft import IGNORE, encode, isomer_groups, prompt_text
from iga.train.student import load_trained


def depth_layers(n_layers: int) -> dict[str, int]:
    """Index into `hidden_states` (0 = embeddings, i = output of block i) for each named depth."""
    return {"quarter": n_layers // 4, "half": n_layers // 2, "three_quarters": 3 * n_layers // 4,
            "penultimate": n_layers - 1}


LINE_FACTOR = 2  # a line this many times longer than the longest training line ends a completion


@dataclass(frozen=True)
class Decoding:
    """How evaluation generates: its token budget and its stop rule (iga.train.decode.Stop)."""
    max_new_tokens: int
    stop: Stop


def decoding(max_new_tokens: Budget, tokenizer: Any, train: Iterable[dict[str, Any]]) -> Decoding:
    """Evaluation's generation sized from the training CoTs (`train`, the rows the student imitates): the
    token budget as set, or for `auto` the tokens the longest training CoT takes with its answer and
    end-of-turn token, and `evaluation_stop` for their longest line."""
    train = list(train)
    lines = [len(tokenizer(line, add_special_tokens=False)["input_ids"]) for r in train
             for line in r["cot_solution"].split("\n")]
    if max_new_tokens == "auto":
        max_new_tokens = max(sum(label != IGNORE for label in encode(tokenizer, r["problem"], r["cot_solution"]).labels)
                             for r in train)
    return Decoding(max_new_tokens, evaluation_stop(max(lines)))


def evaluation_stop(longest_line: int) -> Stop:
    """A completion stops once its `Answer:` line is complete, or once a line runs past LINE_FACTOR times
    `longest_line`, the longest training line's tokens. On the demo's full-length completions neither
    changed a score (tests/test_decode.py, docs/measured.md)."""
    return Stop(answer=True, line_tokens=LINE_FACTOR * longest_line)


def generate(model: Any, tokenizer: Any, problems: list[str], how: Decoding, batch_size: int,
             primed: Mapping[int, Primed] | None = None, on_done: Callable[[int], None] = lambda n: None
             ) -> list[Completion]:
    """Greedy completions of `problems` in the student's chat template, each stopped as `how` says; problem
    `i` in `primed` starts from those states of its prompt."""
    return decode.generate(model, tokenizer, [prompt_text(tokenizer, p) for p in problems], how.max_new_tokens,
                           batch_size, how.stop, on_done, primed)


def score(rows: list[dict[str, Any]], completions: list[str]) -> list[bool]:
    """Exact match of each completion's extracted answer with the row's gold answer."""
    return [(pred := extract_answer(c)) is not None and pred == normalize_answer(str(r["answer"]))
            for r, c in zip(rows, completions)]


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
                     to_generate: set[tuple[str, str]] | None, how: Decoding, batch_size: int,
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

    # NLL of every held-out row and the LCS states of the chosen groups, from one teacher-forced pass, which
    # also leaves the states of the held-out prompts to generate from (the prompt is the forced row's start)
    layers = depth_layers(model.config.num_hidden_layers)
    groups = isomer_groups(test if lcs_rows is None else lcs_rows, train_domains, source)[:lcs_groups] \
        if lcs_groups else []
    skip = {key(r): shared_prefix(seqs) for g in groups
            for seqs in [[encode(tokenizer, x["problem"], x["cot_solution"]).input_ids for x in g]] for r in g}
    rows = test + ood
    rows += [r for g in groups for r in g if key(r) not in {key(x) for x in rows}]
    by_key = {key(r): i for i, r in enumerate(rows)}
    generated = {key(r) for name in held_out for r in chosen[name]}
    t0 = time.perf_counter()
    forced = teacher_forced(model, tokenizer, [(r["problem"], r["cot_solution"]) for r in rows], nll_batch_size,
                            layers=layers.values(), skip=[skip.get(key(r)) for r in rows],
                            prime={i for i, r in enumerate(rows) if key(r) in generated},
                            on_batch=progress("NLL and LCS", len(rows)))
    t1 = time.perf_counter()

    problems = [r["problem"] for rows in chosen.values() for r in rows]
    primed = {n: forced[by_key[key(r)]].primed for n, r in enumerate(r for name in held_out for r in chosen[name])}
    made = generate(model, tokenizer, problems, how, batch_size, primed,
                    on_done=progress("generating", len(problems)))
    del primed
    forced = [dataclasses.replace(f, primed=None) for f in forced]  # their states served: let them go
    flat, t2 = iter(made), time.perf_counter()
    done = {name: [next(flat) for _ in rows] for name, rows in chosen.items()}  # one call: fuller batches
    texts = {name: [c.text for c in made] for name, made in done.items()}

    scores, completions = [], []
    for name, part in held_out.items():
        correct = {key(r): hit for r, hit in zip(chosen[name], score(chosen[name], texts[name]))}
        follows = {key(r): extract_answer(text) == hint for r, text in zip(chosen[name], texts[name])
                   if (hint := stated_hint(r["problem"], r["domain"])) is not None}
        nll = [(forced[by_key[key(r)]].nll, forced[by_key[key(r)]].tokens) for r in part]
        scores += score_records(name, part, [correct.get(key(r)) for r in part], nll,
                                [follows.get(key(r)) for r in part])
        completions += [_record(name, f"{r['group_id']}/{r['domain']}", r["answer"], extract_answer(c.text), c)
                        for r, c in zip(chosen[name], done[name])]
    for name, part in external.items():
        preds = [extract_prediction(name, c) for c in texts[name]]
        scores += score_records(name, part, [is_correct(name, p, r["answer"]) for p, r in zip(preds, part)])
        completions += [_record(name, r["id"], r["answer"], p, c) for r, p, c in zip(part, preds, done[name])]
    consistency = [lcs_record(g, [forced[by_key[key(r)]].states for r in g], layers) for g in groups]
    cost = {"generating_s": round(t2 - t1, 1), "teacher_forced_s": round(t1 - t0, 1),
            "generated_tokens": sum(c.tokens for c in made), "stops": dict(sorted(Counter(c.stop for c in made).items()))}
    return {"scores": scores, "lcs": consistency, "lcs_layers": layers, "completions": completions, "cost": cost}


def _record(name: str, row_id: str, gold: Any, predicted: str | None, c: Completion) -> dict[str, Any]:
    """A completion as completions.jsonl keeps it: what was read from it, how many tokens it took and why
    it stopped (iga.train.decode.Completion)."""
    return {"set": name, "id": row_id, "gold": gold, "predicted": predicted, "completion": c.text, "tokens": c.tokens,
            "stop": c.stop}


def score_adapter(params: Params, base: Path, adapter: Path, test: list[dict[str, Any]], ood: list[dict[str, Any]],
                  train: list[dict[str, Any]], source: str, name: str) -> dict[str, Any]:
    """The lifecycle's evaluation of one adapter: `base` with `adapter` merged in, on every test and OOD
    row and the configured external benchmarks (`eval`; `train`, the training rows, size an `auto` token
    budget), with a progress bar per phase named `name`."""
    ev = params.eval
    torch.set_num_threads(ev.threads)
    device = resolve_device(params.train.device)
    model, tokenizer = load_trained(base, adapter, params.student.dtype)
    model = for_evaluation(model, ev.dtype, device)
    how = decoding(ev.max_new_tokens, tokenizer, train)
    with ExitStack() as bars:  # a progress bar per phase, each closed at the end
        evaluation = evaluate_student(
            model, tokenizer, test, ood, {b: load_benchmark(b, e.limit) for b, e in ev.external.items() if e.limit},
            params.domains.train, to_generate=None, how=how, batch_size=ev.batch_size,
            nll_batch_size=ev.nll_batch_size, lcs_groups=ev.lcs_groups, source=source,
            progress=lambda what, total: bars.enter_context(tqdm(total=total, desc=f"{name}: {what}")).update)
    return evaluation | {"device": describe(device), "dtype": resolve_precision(ev.dtype, device),
                         "decoding": dataclasses.asdict(how)}
