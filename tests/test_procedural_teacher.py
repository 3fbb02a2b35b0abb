import re
from collections import Counter

import numpy as np
import pytest

from conftest import ROOT
from iga.data.seeds import procedural_seeds
from iga.data.teacher import make_teacher
from iga.params import load_params


@pytest.fixture(scope="module")
def setup():
    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": 120})
    teacher = make_teacher(params)
    seeds = procedural_seeds(params.seeds)
    return params, teacher, seeds, [teacher.extraction(s) for s in seeds]


def _rows(setup, attempt=1):
    params, teacher, seeds, extractions = setup
    return [teacher.isomer(s, e, d, attempt) for s, e in zip(seeds, extractions) for d in params.domains.all]


def test_deterministic_and_attempts_differ(setup):
    first = _rows(setup)
    assert first == _rows(setup)
    assert [r["flaw"] for r in first] != [r["flaw"] for r in _rows(setup, attempt=2)]


def test_flaw_rate_and_kinds(setup):
    rows = _rows(setup)
    rate = sum(r["flaw"] is not None for r in rows) / len(rows)
    assert 0.12 < rate < 0.28  # default teacher.flaw_rate 0.2
    assert set(Counter(r["flaw"] for r in rows)) >= {None, "dropped_step", "extra_step", "broken_dependency",
                                                    "wrong_answer"}


def test_alignment_measures_structure(setup):
    rows = _rows(setup)
    clean = [r for r in rows if r["flaw"] is None]
    assert all(r["alignment_score"] == 1.0 for r in clean)
    structural = [r for r in rows if r["flaw"] in ("dropped_step", "extra_step", "broken_dependency")]
    assert all(r["alignment_score"] < 1.0 for r in structural)
    assert sum(r["alignment_score"] < 0.85 for r in structural) / len(structural) > 0.8
    # A wrong answer keeps the structure: the gates cannot see it (realistic label noise).
    assert all(r["alignment_score"] == 1.0 for r in rows if r["flaw"] == "wrong_answer")


def test_cot_has_one_line_per_step(setup):
    params, teacher, seeds, _ = setup
    by_seed = {s["seed_id"]: s for s in seeds}
    for r in _rows(setup):
        lines = r["cot_solution"].splitlines()
        assert lines[-1] == f"Answer: {r['answer']}"
        assert all(re.match(r"Step \d+: ", ln) for ln in lines[:-1])
        expected = by_seed[r["seed_id"]]["dag"]["step_count"]
        shift = {None: 0, "wrong_answer": 0, "broken_dependency": 0, "dropped_step": -1, "extra_step": 1}[r["flaw"]]
        assert r["step_count"] == expected + shift
        if r["flaw"] is None:
            assert r["answer"] == by_seed[r["seed_id"]]["answer"]


def test_domains_differ_in_vocabulary(setup):
    params, *_ = setup
    rows = [r for r in _rows(setup) if r["flaw"] is None]
    words = {d: Counter(w for r in rows if r["domain"] == d for w in re.findall(r"[a-z]{4,}", r["problem"].lower()))
             for d in params.domains.all}
    top = {d: {w for w, _ in c.most_common(30)} for d, c in words.items()}
    for a in params.domains.all:
        for b in params.domains.all:
            if a < b:
                overlap = len(top[a] & top[b]) / 30
                assert overlap < 0.5, (a, b, top[a] & top[b])
    assert {r["domain_kind"] for r in rows if r["domain"] in params.domains.ood} == {"ood"}


DOMAIN_NAMES = ("mathematics", "medical", "legal", "science")


@pytest.mark.parametrize("rate, ood_cue", [(0.0, "reversed"), (0.9, "none"), (0.9, "reversed"), (1.0, "reversed")])
def test_hints_are_right_in_training_domains_and_wrong_out_of_domain(rate, ood_cue):
    """A yes/no question ends with its domain's hint at `shortcut_rate`: at the true answer in the training
    domains (every hint reliable here); in the held-out domains only with ood_cue reversed, and then at the
    wrong answer."""
    from iga.data.domains import DOMAINS

    params = load_params(ROOT / "params.yaml", overrides={
        "seeds.n": 60, "teacher.shortcut_rate": rate, "teacher.ood_cue": ood_cue,
        "teacher.cue_reliability": dict.fromkeys(DOMAIN_NAMES, 1.0)})
    teacher = make_teacher(params)
    cued = Counter()
    for seed in procedural_seeds(params.seeds):
        extraction = teacher.extraction(seed)
        for domain in params.domains.all:
            row = teacher.isomer(seed, extraction, domain, 1)
            truth = seed["answer"]
            yes_cue, no_cue = DOMAINS[domain].cues
            has = {c for c in (yes_cue, no_cue) if row["problem"].endswith(c)}
            held_out = domain in params.domains.ood
            if truth not in ("yes", "no") or (held_out and ood_cue == "none"):
                assert not has
                continue
            right, wrong = (yes_cue, no_cue) if truth == "yes" else (no_cue, yes_cue)
            assert has <= {wrong if held_out else right}
            cued[held_out, bool(has)] += 1
    for held_out in (False, True) if ood_cue == "reversed" else (False,):
        share = cued[held_out, True] / (cued[held_out, True] + cued[held_out, False])
        assert share == pytest.approx(rate, abs=0.12)


def test_each_training_domain_hints_right_at_its_own_reliability():
    """The Colored-MNIST design (docs/concepts.md): every yes/no question hinted, the hint right with its
    domain's probability, wrong everywhere out of domain; the CoT and the answer stay true whatever the hint."""
    from iga.data.domains import DOMAINS

    reliability = {"mathematics": 0.95, "medical": 0.85, "legal": 0.75, "science": 0.65}
    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": 200, "teacher.shortcut_rate": 1.0,
                                                          "teacher.cue_reliability": reliability})
    teacher = make_teacher(params)
    right: dict[str, list[bool]] = {d: [] for d in params.domains.all}
    for seed in procedural_seeds(params.seeds):
        if seed["answer"] not in ("yes", "no"):
            continue
        extraction = teacher.extraction(seed)
        for domain in params.domains.all:
            row = teacher.isomer(seed, extraction, domain, 1)
            yes_cue, no_cue = DOMAINS[domain].cues
            assert row["problem"].endswith((yes_cue, no_cue))
            right[domain].append(row["problem"].endswith(yes_cue if seed["answer"] == "yes" else no_cue))
            assert row["cot_solution"].endswith(f"Answer: {row['answer']}")
    n = len(right["mathematics"])
    assert n >= 80
    for domain, p in reliability.items():  # within 3 binomial standard errors
        assert np.mean(right[domain]) == pytest.approx(p, abs=3 * np.sqrt(p * (1 - p) / n) + 1e-9), domain
    assert not any(any(right[d]) for d in params.domains.ood) and all(right[d] for d in params.domains.ood)
