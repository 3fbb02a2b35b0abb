"""The experiment as a sweep, DomainBed's way: random hyperparameter draws, a training-domain validation
set, and model selection on it.

- **Draws** (DomainBed's hparams_registry): draw 0 of a method is its configured hyperparameters
  (`methods.<name>`, `train.lr`); draw k ≥ 1 takes `lr` (`experiment.ranges.train`) and each hyperparameter
  that `experiment.ranges.<kind>` names for the method's kind at random from its range, log-uniform or
  uniform, with a generator seeded by (method, k, hyperparameter) — the same values on every machine
  and in every re-run, and adding a range leaves the other hyperparameters' draws alone. Unlike
  DomainBed, whose draws also depend on the trial seed, a draw here is the same for every training
  seed: a draw is one configuration, run once per seed.
- **Validation** (DomainBed's holdout of each training environment): `experiment.val_seeds` seeds of
  the training split, all their instances held out of every run's training: their training-domain
  instances are the validation set, their held-out-domain instances (which the split leaves out of
  every side) the test-domain validation set. The test and OOD sets are never looked at.
- **Selection**, both of DomainBed's rules, picked per trial and then averaged: for each run and each
  training seed, the draw with the highest accuracy on the validation set (training-domain validation,
  `IIDAccuracySelectionMethod`) or on the test-domain validation set (test-domain "oracle" validation,
  `OracleSelectionMethod`: what selection could do with access to the held-out domains, not a rule a
  user has); ties go to the lower NLL there, then to the lower draw (the defaults first). The run's
  figures are those of its selected (draw, seed) results, one per seed, with intervals over training
  seeds and test seeds: the spread over seeds includes the selection's own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from typing import Any, Iterable, Mapping, NamedTuple

from iga.errors import DataError
from iga.experiment.variants import complete_groups
from iga.params import HparamRange, IGAConfig, MethodConfig, Params

# each rule -> where a result's validation figures for it are: its validation record, or that record's `ood`
SELECTIONS = {"training-domain validation": None, "test-domain validation": "ood"}
Row = dict[str, Any]


def seed_hash(*args: Any) -> int:
    """An integer seed from any values (DomainBed's misc.seed_hash): stable across processes and machines."""
    return int(hashlib.md5(str(args).encode()).hexdigest(), 16) % 2**31


class Pair(NamedTuple):
    """One cell of the matrix: a run of `experiment.runs`, a hyperparameter draw, a training seed. Each is one
    DVC stage (dvc.yaml: `run@<key>` for draw 0, `sweep@<key>` for the random draws)."""
    run: str
    draw: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.run}-d{self.draw}-s{self.seed}"

    @property
    def group(self) -> str:
        """The foreach stage it belongs to: draw 0 depends on no range, a random draw on its kind's."""
        return "sweep" if self.draw else "run"

    @property
    def stage(self) -> str:
        return f"{self.group}@{self.key}"

    @property
    def name(self) -> str:
        return f"{self.run}/draw{self.draw}/seed{self.seed}"


def ranged(config: MethodConfig, ranges: Mapping[str, Mapping[str, HparamRange]]) -> dict[str, HparamRange]:
    """The hyperparameters a draw of a method of this configuration takes at random: `lr` (section `train` of
    `experiment.ranges`) and those of its kind's section, IGA's τ only where its mask uses τ."""
    own = {field: r for field, r in ranges.get(config.kind, {}).items()
           if not (isinstance(config, IGAConfig) and field == "tau" and config.mask != "exp")}
    return {**ranges.get("train", {}), **own}


def ranges_read(params: Params, run: str) -> str:
    """The section of `experiment.ranges` a run's random draws read besides `train`: its method's kind, or
    `train` again where the kind has no section."""
    kind = params.methods[params.experiment.runs[run].method].kind
    return kind if kind in params.experiment.ranges else "train"


def sample(r: HparamRange, rng: random.Random) -> float:
    """One value in [lo, hi], to 4 significant digits (readable in the tables, still inside the range)."""
    if r.scale == "log":
        value = 10 ** rng.uniform(math.log10(r.lo), math.log10(r.hi))
    else:
        value = rng.uniform(r.lo, r.hi)
    return min(max(float(f"{value:.4g}"), r.lo), r.hi)


def hparams(params: Params, method: str, draw: int) -> dict[str, float]:
    """The values of the swept hyperparameters of `method` (a key of `methods`) in draw `draw`."""
    config, ranges = params.methods[method], params.experiment.ranges
    fields = ranged(config, ranges)
    if draw == 0:
        return {f: params.train.lr if f == "lr" else getattr(config, f) for f in fields}
    return {f: sample(r, random.Random(seed_hash(method, draw, f))) for f, r in fields.items()}


def drawn(params: Params, run: str, draw: int) -> Params:
    """`params` as draw `draw` of experiment run `run` trains: its method's swept fields and train.lr replaced."""
    method = params.experiment.runs[run].method
    values = dict(hparams(params, method, draw))
    lr = values.pop("lr", params.train.lr)
    config = dataclasses.replace(params.methods[method], **values)
    return dataclasses.replace(params, train=dataclasses.replace(params.train, lr=lr),
                               methods={**params.methods, method: config})


def draws(params: Params, run: str) -> range:
    """The draws a run takes: all `experiment.hparam_draws` for Table 1's runs and the oracle (the methods
    and their reference are compared with the same search budget), draw 0 alone for Table 2's ablations
    (IGA with one thing changed at the configured hyperparameters; a search over τ would undo the τ
    ablations)."""
    return range(params.experiment.hparam_draws if _compared(params, run) else 1)


def seeds_of(params: Params, run: str) -> tuple[int, ...]:
    """The training seeds a run takes: every one of `experiment.seeds` for Table 1's runs and the oracle,
    `experiment.table2_seeds` for an ablation alone (compared with IGA on those seeds)."""
    ex = params.experiment
    return ex.seeds if _compared(params, run) else ex.table2_seeds


def _compared(params: Params, run: str) -> bool:
    """Table 1's runs and the oracle, as opposed to Table 2's ablations."""
    ex = params.experiment
    return run in ex.table1 or run == ex.oracle


def matrix(params: Params) -> list[Pair]:
    """Every (run, draw, seed) of Tables 1 and 2 and the oracle, draw by draw: a matrix stopped early has its
    defaults first."""
    ex = params.experiment
    runs = list(dict.fromkeys(ex.table1 + ((ex.oracle,) if ex.oracle else ()) + ex.table2))
    return [Pair(run, d, seed) for d in range(ex.hparam_draws) for run in runs if d in draws(params, run)
            for seed in ex.seeds if seed in seeds_of(params, run)]


def validation_seeds(train: Iterable[Row], n: int, train_domains: tuple[str, ...], seed: int, source: str
                     ) -> frozenset[str]:
    """`n` seeds of the (seed-level) training split with a complete isomer group, a sample seeded by `seed`."""
    candidates = sorted({r["seed_id"] for r in complete_groups(list(train), train_domains)})
    if n >= len(candidates):
        raise DataError(f"{source}: experiment.val_seeds = {n} would hold out all {len(candidates)} training seeds "
                        "with a complete isomer group; lower it")
    return frozenset(random.Random(seed_hash("validation", seed)).sample(candidates, n))


def hold_out(rows: Iterable[Row], seeds: frozenset[str], domains: tuple[str, ...]) -> tuple[list[Row], list[Row]]:
    """(the rows left to train on, the validation rows): every row of a validation seed leaves training;
    its rows in `domains` are a validation set (the training domains; the held-out ones for test-domain
    validation, from the gate's accepted rows, where the split left them)."""
    rows = list(rows)
    return ([r for r in rows if r["seed_id"] not in seeds],
            [r for r in rows if r["seed_id"] in seeds and r["domain"] in domains])


def validation(correct: list[bool], nll: list[tuple[float, int]]) -> dict[str, float]:
    """A run's validation figures: accuracy over the validation problems, mean per-token NLL of their gold
    CoTs (each problem weighted alike, as the test NLL is)."""
    if not correct:
        raise DataError("an empty validation set: raise experiment.val_seeds")
    return {"accuracy": sum(correct) / len(correct), "nll": sum(s / max(n, 1) for s, n in nll) / len(nll),
            "n": len(correct)}


def select(results: Iterable[Mapping[str, Any]], rule: str = "training-domain validation"
           ) -> dict[tuple[str, int], Mapping[str, Any]]:
    """For each (run, training seed), the result of the draw with the best accuracy on the validation set
    of `rule` (a key of SELECTIONS); ties to the lower NLL there, then to the lower draw. Results carry
    `run`, `draw`, `seed` and `validation` ({accuracy, nll, ood: {accuracy, nll}})."""
    best: dict[tuple[str, int], Mapping[str, Any]] = {}
    for r in results:
        key = (r["run"], r["seed"])
        if key not in best or _rank(r, rule) < _rank(best[key], rule):
            best[key] = r
    return best


def validation_of(result: Mapping[str, Any], rule: str) -> Mapping[str, Any]:
    """A result's validation figures ({accuracy, nll, n}) on the validation set of `rule`."""
    part = SELECTIONS[rule]
    return result["validation"] if part is None else result["validation"][part]


def _rank(result: Mapping[str, Any], rule: str) -> tuple[float, float, int]:
    v = validation_of(result, rule)
    return -v["accuracy"], v["nll"], result["draw"]
