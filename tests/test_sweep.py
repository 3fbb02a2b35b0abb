"""The sweep's pure parts (iga/experiment/sweep.py): DomainBed-style draws, the validation slice, selection."""
import dataclasses
import json
import math
import random

import pytest
from conftest import ROOT, isomer_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from iga.errors import DataError
from iga.experiment.sweep import drawn, hold_out, hparams, matrix, sample, select, validation, validation_seeds
from iga.params import HparamRange, load_params, parse_params

P = load_params(ROOT / "params.yaml")
DOMAINS = P.domains.train


def _as_yaml(params) -> dict:
    """Params back to what params.yaml holds (tuples as lists), to validate a drawn configuration."""
    return json.loads(json.dumps(dataclasses.asdict(params)))


def test_draw_zero_is_the_configured_hyperparameters():
    for run in P.experiment.table1:
        assert drawn(P, run, 0) == P
    assert hparams(P, "irm", 0) == {"lr": P.train.lr, "penalty_weight": 100.0, "anneal_frac": 0.1}
    assert hparams(P, "pcgrad", 0) == {"lr": P.train.lr}  # no method-specific range: lr alone


def test_draws_are_seeded_by_method_draw_and_name():
    assert hparams(P, "irm", 3) == hparams(P, "irm", 3)
    assert hparams(P, "irm", 3) != hparams(P, "irm", 4)
    assert hparams(P, "irm", 3)["penalty_weight"] != hparams(P, "vrex", 3)["penalty_weight"]
    # one generator per hyperparameter: dropping the lr range leaves τ's draw as it was
    no_lr = dataclasses.replace(P, experiment=dataclasses.replace(
        P.experiment, ranges={k: v for k, v in P.experiment.ranges.items() if k != "train"}))
    assert hparams(no_lr, "iga", 2) == {"tau": hparams(P, "iga", 2)["tau"]}
    # runs of the same method draw the same values; each run still selects its own draw
    assert drawn(P, "cot-distill", 2).train.lr == drawn(P, "erm", 2).train.lr != P.train.lr


def test_a_draw_replaces_only_the_swept_fields():
    p = drawn(P, "iga", 1)
    values = hparams(P, "iga", 1)
    assert p.train.lr == values["lr"] and p.methods["iga"].tau == values["tau"]
    assert dataclasses.replace(p.methods["iga"], tau=P.methods["iga"].tau) == P.methods["iga"]
    assert {k: v for k, v in p.methods.items() if k != "iga"} == {k: v for k, v in P.methods.items() if k != "iga"}
    assert "tau" not in hparams(P, "iga-and-mask", 1)  # its binary mask has no τ


@pytest.mark.parametrize("run", ["erm", "irm", "vrex", "sand-mask", "and-mask", "iga", "iga-paper", "pareto-gs"])
def test_every_draw_is_a_valid_configuration(run):
    for draw in range(1, 16):
        parse_params(_as_yaml(drawn(P, run, draw)))  # every params check, the ranges' included


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(1e-6, 1e3), width=st.floats(1.001, 1e4), log=st.booleans(), rng=st.randoms())
def test_a_sample_lies_in_its_range(lo, width, log, rng):
    r = HparamRange(lo, lo * width, "log" if log else "linear")
    assert r.lo <= sample(r, rng) <= r.hi


def test_log_scale_is_log_uniform():
    log, linear = HparamRange(1e-4, 1e-2, "log"), HparamRange(1e-4, 1e-2, "linear")
    below = lambda r: sum(sample(r, random.Random(i)) < 1e-3 for i in range(2000)) / 2000  # noqa: E731
    assert abs(below(log) - 0.5) < 0.05  # the geometric midpoint halves a log-uniform range
    assert abs(below(linear) - 0.9e-3 / 9.9e-3) < 0.03
    assert math.isclose(sample(HparamRange(0.5, 1.0, "linear"), random.Random(0)),
                        float(f"{random.Random(0).uniform(0.5, 1.0):.4g}"))


@pytest.mark.parametrize("draws", [1, 2])
def test_the_matrix_sweeps_table1_and_the_oracle_and_runs_table2_at_the_defaults_on_its_seeds(draws):
    params = load_params(ROOT / "params.yaml", overrides={"experiment.hparam_draws": draws,
                                                          "experiment.table2_seeds": [2, 0]})
    pairs = matrix(params)
    ex = params.experiment
    assert ex.oracle == "oracle" and ex.oracle not in ex.table1 + ex.table2
    assert len(pairs) == len(ex.seeds) * (len(ex.table1) + 1) * draws + 2 * len(set(ex.table2) - set(ex.table1))
    every = {(d, s) for d in range(draws) for s in ex.seeds}
    assert {(d, s) for r, d, s in pairs if r == "irm"} == every == {(d, s) for r, d, s in pairs if r == "oracle"}
    assert {(d, s) for r, d, s in pairs if r in ex.table2} == {(0, 0), (0, 2)}  # the defaults, on table2_seeds
    assert len(set(pairs)) == len(pairs)


@pytest.fixture(scope="module")
def train_rows():
    rows = isomer_rows(20)
    return rows + [dict(r, domain="finance") for r in rows if r["domain"] == DOMAINS[0]]


def test_the_validation_slice_is_whole_training_seeds_and_training_domains_only(train_rows):
    seeds = validation_seeds(train_rows, 4, DOMAINS, 0, "x")
    assert len(seeds) == 4 and seeds == validation_seeds(list(reversed(train_rows)), 4, DOMAINS, 0, "x")
    assert seeds != validation_seeds(train_rows, 4, DOMAINS, 1, "x")  # seeded by split.seed
    train, val = hold_out(train_rows, seeds, DOMAINS)
    assert {r["seed_id"] for r in val} == seeds and not seeds & {r["seed_id"] for r in train}
    assert len(val) == 4 * len(DOMAINS) and {r["domain"] for r in val} == set(DOMAINS)
    assert len(train) + len(val) + 4 == len(train_rows)  # the validation seeds' finance rows leave too


def test_a_validation_slice_must_leave_seeds_to_train_on(train_rows):
    with pytest.raises(DataError, match="experiment.val_seeds = 20"):
        validation_seeds(train_rows, 20, DOMAINS, 0, "x")
    with pytest.raises(DataError, match="empty validation set"):
        validation([], [])


def test_validation_figures():
    assert validation([True, False, True, True], [(2.0, 4), (1.0, 1), (0.0, 2), (3.0, 3)]) == \
        {"accuracy": 0.75, "nll": (0.5 + 1.0 + 0.0 + 1.0) / 4, "n": 4}


def _result(run: str, draw: int, seed: int, accuracy: float, nll: float = 1.0, ood: float = 0.0) -> dict:
    return {"run": run, "draw": draw, "seed": seed,
            "validation": {"accuracy": accuracy, "nll": nll, "ood": {"accuracy": ood, "nll": nll}}}


def test_test_domain_selection_reads_the_held_out_domains_validation():
    """DomainBed's two rules on the same results: the draw best in the training domains is not the one best
    in the held-out domains (a draw that fits the hint)."""
    results = [_result("erm", 0, 0, 0.75, ood=0.25), _result("erm", 1, 0, 0.5, ood=0.5),
               _result("erm", 2, 0, 0.5, ood=0.5, nll=0.9)]
    assert select(results)[("erm", 0)]["draw"] == 0
    assert select(results, "test-domain validation")[("erm", 0)]["draw"] == 2  # the tie to the lower NLL
    with pytest.raises(KeyError):
        select(results, "leave-one-domain-out")


def test_selection_is_per_training_seed_with_ties_to_the_lower_nll_then_the_lower_draw():
    results = [_result("erm", 0, 0, 0.5), _result("erm", 1, 0, 0.75), _result("erm", 2, 0, 0.75, nll=0.9),
               _result("erm", 0, 1, 0.5), _result("erm", 1, 1, 0.25),
               _result("iga", 0, 0, 0.5), _result("iga", 1, 0, 0.5)]
    chosen = {k: r["draw"] for k, r in select(results).items()}
    assert chosen == {("erm", 0): 2, ("erm", 1): 0, ("iga", 0): 0}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 8), st.integers(0, 4)), min_size=1, max_size=30,
                unique_by=lambda t: (t[0], t[1])), st.randoms())
def test_selection_takes_the_best_and_ignores_order(cells, rnd):
    results = [_result("m", draw, seed, hits / 4, nll=1.0) for seed, draw, hits in cells]
    chosen = select(results)
    shuffled = results[:]
    rnd.shuffle(shuffled)
    assert select(shuffled) == chosen
    for (_, seed), r in chosen.items():
        same_seed = [x for x in results if x["seed"] == seed]
        best = max(x["validation"]["accuracy"] for x in same_seed)
        assert r["validation"]["accuracy"] == best
        assert r["draw"] == min(x["draw"] for x in same_seed if x["validation"]["accuracy"] == best)
