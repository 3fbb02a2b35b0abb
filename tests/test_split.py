from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from iga.data.split import side, split
from iga.params import load_params

P = load_params(ROOT / "params.yaml")
DOMAINS = P.domains.train + P.domains.ood


def rows_for(seed_ids):
    return [{"seed_id": s, "group_id": f"g-{s}", "domain": d} for s in seed_ids for d in DOMAINS]


@settings(max_examples=60, deadline=None)
@given(seed_ids=st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=60),
       fraction=st.floats(0.05, 0.95), split_seed=st.integers(0, 10**6))
def test_seed_split_never_shares_a_seed(seed_ids, fraction, split_seed):
    sp = replace(P.split, test_fraction=fraction, seed=split_seed)
    out, metrics = split(rows_for(seed_ids), sp, P.domains)
    train = {r["seed_id"] for r in out["train"]}
    test = {r["seed_id"] for r in out["test"]} | {r["seed_id"] for r in out["ood"]}
    assert not train & test and train | test == seed_ids
    assert {r["domain"] for r in out["train"] + out["test"]} <= set(P.domains.train)
    assert {r["domain"] for r in out["ood"]} <= set(P.domains.ood)
    assert {r["seed_id"] for r in out["ood"]} <= test
    assert metrics["seeds_in_both_sides"] == 0 and not metrics["leakage"]


@given(seed_ids=st.lists(st.text(min_size=1), min_size=2, max_size=40, unique=True))
def test_a_seed_side_does_not_depend_on_the_others(seed_ids):
    sp = P.split
    alone = {s: side(s, sp.seed, sp.test_fraction) for s in seed_ids}
    out, _ = split(rows_for(seed_ids), sp, P.domains)
    together = {r["seed_id"]: "train" for r in out["train"]} | {r["seed_id"]: "test" for r in out["test"]}
    assert together == alone


def test_fraction_is_close_to_requested():
    out, metrics = split(rows_for([f"s{i}" for i in range(2000)]), P.split, P.domains)
    assert abs(metrics["test_fraction_realized"] - 0.2) < 0.03


def test_instance_unit_leaks_and_says_so():
    out, metrics = split(rows_for([f"s{i}" for i in range(200)]), replace(P.split, unit="instance"), P.domains)
    assert metrics["unit"] == "instance" and metrics["leakage"] and metrics["seeds_in_both_sides"] > 0
