"""One (run, hyperparameter draw, training seed) of the experiment, trained and evaluated: the computation of
a pair stage, apart from where its files live and where it logs. tasks/experiment.py runs it as a DVC stage
(its files, MLflow, its checkpoints' home); tools/run_pairs.py runs it where only torch, transformers and peft
are installed (a lent GPU machine), several at a time.
"""
from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from iga.data.split import split
from iga.errors import DataError
from iga.eval.evaluate import decoding, evaluate_student, for_evaluation, generate, score, teacher_forced
from iga.eval.scores import summarize
from iga.experiment.sweep import Pair, drawn, hold_out, hparams, validation, validation_seeds
from iga.experiment.variants import as_seen, complete_groups, evaluation_sets, run_domains, train_units
from iga.hardware import describe, resolve_precision
from iga.io import read_jsonl
from iga.params import Params, TrainParams
from iga.train.loop import summarize as summarize_training, train, trainable
from iga.train.methods import build_method
from iga.train.sft import batcher, encode_groups
from iga.train.student import load_student

Row = dict[str, Any]
Rows = dict[str, list[Row]]  # a split's train/test/ood rows


@dataclasses.dataclass(frozen=True)
class PairData:
    """What a pair reads: the split stage's rows, the gate's accepted rows (the held-out domains' validation
    problems, and another split unit's rows), the rows it trains on, and the paths that errors name."""
    split: Rows          # train/test/ood, split by params.split.unit
    accepted: list[Row]
    split_file: str      # the split's training rows (errors, the batch order's source)
    accepted_file: str
    training: list[Row]  # the split's training rows, each with the CoT the run's `select` kept (its selected@ stage)
    training_file: str

    @classmethod
    def read(cls, files: Mapping[str, Path]) -> PairData:
        """From the files that tasks.paths.pair_inputs names: train, test, ood, accepted, training."""
        return cls({side: read_jsonl(files[side]) for side in ("train", "test", "ood")}, read_jsonl(files["accepted"]),
                   str(files["train"]), str(files["accepted"]), read_jsonl(files["training"]), str(files["training"]))

    def __post_init__(self) -> None:
        key = lambda r: (r["group_id"], r["domain"])  # noqa: E731
        if sorted(map(key, self.training)) != sorted(map(key, self.split["train"])):
            raise DataError(f"{self.training_file}: not a selection among {self.split_file}'s training instances "
                            "(made from another split: `dvc repro` the selected stage)")


def pair_train_params(params: Params, seed: int) -> TrainParams:
    return dataclasses.replace(params.train, seed=seed, steps=params.experiment.steps)


def unit_split(params: Params, data: PairData, unit: str) -> tuple[Rows, str]:
    """The train/test/OOD rows of a `unit`-level split and the file they come from: the split stage's when it
    split by `unit` (the default, seed), else the accepted rows split here (the instance-level leakage
    ablation)."""
    if unit == params.split.unit:
        return data.split, data.split_file
    parts, _ = split(data.accepted, dataclasses.replace(params.split, unit=unit), params.domains)
    return parts, data.accepted_file


def run_pair(params: Params, pair: Pair, data: PairData, base: Path, device: torch.device, *, checkpoints: Path,
             key: str, resumed_at: int = 0, verifier: Any = None,
             on_step: Callable[[dict[str, float]], None] | None = None,
             extra_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `pair` for experiment.steps from the student at `base` on `device` (torch's threads as set) and
    evaluate it on the held-out sets and the validation set. Returns its outputs, {metrics, scores, lcs},
    unwritten. Checkpoints go to `checkpoints` under `key` (a killed pair resumes from them, `resumed_at` its
    step); `verifier` is VCD's; `on_step` sees every step's record; `extra_state` is saved in each checkpoint."""
    name, draw, seed = pair
    start = time.time()
    run, ex = params.experiment.runs[name], params.experiment
    values = hparams(params, run.method, draw)
    params = drawn(params, name, draw)
    tp = pair_train_params(params, seed)
    seed_level, _ = unit_split(params, data, "seed")  # LCS and validation: the seed-level split whatever the run's
    parts, source = unit_split(params, data, run.split)
    # the split stage's training rows with the CoTs the run's selection kept (params: a selection needs that split)
    training, training_file = ((data.training, data.training_file) if run.split == params.split.unit else
                               (parts["train"], source))
    seed_level, parts = ({side: as_seen(rows, run) for side, rows in sides.items()} for sides in (seed_level, parts))
    precision, eval_dtype = resolve_precision(tp.precision, device), resolve_precision(params.eval.dtype, device)

    held = validation_seeds(seed_level["train"], ex.val_seeds, params.domains.train, params.split.seed,
                            data.split_file)
    _, val_rows = hold_out(seed_level["train"], held, params.domains.train)
    val_ood = as_seen(hold_out(data.accepted, held, params.domains.ood)[1], run)  # test-domain validation
    train_rows, _ = hold_out(as_seen(training, run), held, params.domains.train)  # none trains on a validation seed
    units = train_units(complete_groups(train_rows, params.domains.train), run, params.domains.train, seed,
                        training_file)
    model, tokenizer = load_student(base, params.lora, params.student.dtype, seed=seed)
    model.to(device)
    encoded, too_long = encode_groups(tokenizer, units, tp.max_length)
    if not encoded:
        raise DataError(f"{training_file}: run {name} has no training unit within train.max_length = {tp.max_length}")
    per_batch = tp.groups_per_batch * len(params.domains.train) // len(encoded[0])  # same sequences for every run
    micro_batches = batcher(encoded, tp, per_batch, tokenizer.pad_token_id)
    method = build_method(params.methods[run.method], model, run_domains(run, params.domains.train), tokenizer,
                          verifier)
    n_trainable = sum(p.numel() for p in trainable(model).values())
    t0 = time.perf_counter()
    history = train(model, method, micro_batches, tp, checkpoints, key, device, on_step=on_step,
                    extra_state=extra_state or {})
    train_s = time.perf_counter() - t0

    test, ood, to_generate, lcs_rows = evaluation_sets(seed_level, parts, run.split, ex.eval_groups, params.domains,
                                                       source)
    model = for_evaluation(model, params.eval.dtype, device)
    how = decoding(ex.max_new_tokens, tokenizer, seed_level["train"])
    evaluation = evaluate_student(model, tokenizer, test, ood, {}, params.domains.train, to_generate=to_generate,
                                  how=how, batch_size=params.eval.batch_size, nll_batch_size=params.eval.nll_batch_size,
                                  lcs_groups=len(lcs_rows), source=source, lcs_rows=lcs_rows)
    # validation in the training domains and in the held-out ones: greedy accuracy as the test sets are scored,
    # and the gold CoTs' NLL (the tie-break)
    both = val_rows + val_ood
    forced = teacher_forced(model, tokenizer, [(r["problem"], r["cot_solution"]) for r in both],
                            params.eval.nll_batch_size, prime=range(len(both)))
    completions = generate(model, tokenizer, [r["problem"] for r in both], how, params.eval.batch_size,
                           {i: f.primed for i, f in enumerate(forced)})
    figures = [validation(score(rows, [c.text for c in completions[part]]), [(f.nll, f.tokens) for f in forced[part]])
               for rows, part in ((val_rows, slice(len(val_rows))), (val_ood, slice(len(val_rows), None)))]
    summary = summarize_training(name, history, {"units_train": len(encoded), "units_too_long": too_long,
                                                 "trainable_parameters": n_trainable, "train_s": train_s,
                                                 "eval_s": time.perf_counter() - t0 - train_s,
                                                 "resumed_at_step": resumed_at})
    ran = {"device": describe(device), "train_precision": precision, "eval_dtype": eval_dtype,
           "decoding": dataclasses.asdict(how), "host": socket.gethostname(), "threads": torch.get_num_threads(),
           "start": start, "end": time.time()}
    return {"metrics": {"run": name, "draw": draw, "seed": seed, "hparams": values,
                        "validation": figures[0] | {"ood": figures[1]},
                        "eval": summarize([evaluation], evaluation["lcs_layers"]), "lcs_layers": evaluation["lcs_layers"],
                        "train": summary, "history": history, "ran": ran},
            "scores": evaluation["scores"], "lcs": evaluation["lcs"]}
