"""Validity-calibrated distillation: beta = 0 is ERM bit for bit; a wrong student line raises the weight
of the teacher's line it disagrees with, a flawed teacher line loses its weight; it trains end to end."""
import dataclasses

import pytest
import torch

from conftest import ROOT
from iga.data.seeds import procedural_seeds
from iga.data.teacher import make_teacher
from iga.data.verify import make_verifier
from iga.params import load_params
from iga.train import methods
from iga.train.methods import build_method, forward_losses
from iga.train.pergrad import lora_layers
from iga.train.sft import collate, encode_groups, isomer_groups
from iga.train.student import load_student
from iga.train.vcd import line_weight, token_lines

P = load_params(ROOT / "params.yaml", overrides={"seeds.n": 6, "teacher.flaw_rate": 0.0})
DOMAINS = P.domains.train
SEEDS = procedural_seeds(P.seeds)
TEACHER = make_teacher(P)
ROWS = [TEACHER.isomer(s, TEACHER.extraction(s), d, 1) for s in SEEDS for d in DOMAINS]


def student(tiny_base):
    model, tokenizer = load_student(tiny_base, P.lora, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # PEFT's B = 0 makes A's gradients vanish: test the general case
        for layer in lora_layers(model):
            layer.B.normal_(0, 0.05)
    return model, tokenizer


def batch(tokenizer, rows=ROWS, k=2):
    groups, _ = encode_groups(tokenizer, isomer_groups(rows, DOMAINS, "rows"), 1024)
    return collate(groups[:k], tokenizer.pad_token_id, seed=0)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def vcd(model, tokenizer, **changes):
    config = dataclasses.replace(P.methods["vcd"], **changes)
    return build_method(config, model, DOMAINS, tokenizer, make_verifier(P, SEEDS, TEACHER))


def test_the_weight_formula():
    assert line_weight(1, 0, 1.0, 0.0, 2.0) == 2.0  # teacher right, student wrong: learn it harder
    assert line_weight(0, 1, 1.0, 0.0, 2.0) == 0.0  # teacher wrong, student right: do not copy the flaw
    assert line_weight(1, 1, 3.0, 0.0, 2.0) == 1.0
    assert line_weight(0, 0, 1.0, 0.0, 2.0) == 0.0  # both wrong: the flaw is not imitated at full weight
    assert line_weight(0, 0, 0.5, 0.0, 2.0) == line_weight(0, 1, 0.5, 0.0, 2.0) == 0.5  # whatever the student says
    assert line_weight(0.5, 0.0, 1.0, 0.0, 2.0) == 1.0  # a line that leaps is not learned harder
    assert line_weight(0.5, 1.0, 1.0, 0.0, 2.0) == 0.5
    assert line_weight(1, 0, 5.0, 0.0, 2.0) == 2.0  # clipped
    assert line_weight(0.5, 0.0, 0.0, 0.0, 2.0) == 1.0  # beta 0


def test_beta_zero_is_erm_bit_for_bit(tiny_base):
    model, tokenizer = student(tiny_base)
    b = batch(tokenizer)
    erm = build_method(P.methods["erm"], model, DOMAINS).step(b)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    got = vcd(model, tokenizer, beta=0.0).step(b)
    assert got["loss"] == erm["loss"] and got["weight_mean"] == 1.0
    for name, g in grads(model).items():
        assert torch.equal(g, expected[name]), name


def _weighted_grads(model, b, weights):
    model.zero_grad(set_to_none=True)
    sums, counts, _ = forward_losses(model, b, weights=torch.tensor(weights))
    (sums.sum() / counts.sum()).backward()
    return grads(model)


def test_a_wrong_student_line_raises_the_weight_of_that_teacher_line(tiny_base, monkeypatch):
    """The student proposes the teacher's own lines except one wrong value: only that line's tokens get
    w = 1 + beta; the step's gradient is exactly that weighted loss's."""
    model, tokenizer = student(tiny_base)
    row = next(r for r in ROWS if r["domain"] == "mathematics" and "=" in r["cot_solution"].split("\n")[0])
    lines = row["cot_solution"].split("\n")
    wrong = lines[0].rsplit(" ", 1)[0] + " 99999."

    def propose(model, tokenizer, requests, max_tokens):
        return [wrong if len(prefix) == 0 else lines[len(prefix)] for _, prefix in requests]

    monkeypatch.setattr(methods, "propose_lines", propose)
    group = [r for r in ROWS if r["group_id"] == row["group_id"]]
    b = batch(tokenizer, group, k=1)
    method = vcd(model, tokenizer, beta=0.5)
    model.zero_grad(set_to_none=True)
    metrics = method.step(b)
    got = grads(model)
    expected_w = []
    for r in b.sources:  # the proposals are the mathematics row's lines, whose values every isomer shares (the
        # verifier recognises a computation by its values): right everywhere but the first, wrong everywhere
        per_line = [1.5] + [1.0] * r["cot_solution"].count("\n")
        expected_w += [per_line[i] for i in token_lines(tokenizer, r["cot_solution"])]
    assert metrics["v_teacher"] == 1.0 and metrics["v_student"] < 1.0
    reference = _weighted_grads(model, b, expected_w)
    for name, g in got.items():
        assert torch.equal(g, reference[name]), name
    assert any(not torch.equal(got[n], _weighted_grads(model, b, [1.0] * len(expected_w))[n]) for n in got)


@pytest.mark.parametrize("student_copies_the_flaw", [False, True])
def test_a_flawed_teacher_line_loses_its_weight(tiny_base, monkeypatch, student_copies_the_flaw):
    """Teacher line wrong, student line right or wrong too: w = w_min (0), the flawed line teaches nothing."""
    model, tokenizer = student(tiny_base)
    row = next(r for r in ROWS if r["domain"] == "mathematics" and "=" in r["cot_solution"].split("\n")[0])
    lines = row["cot_solution"].split("\n")
    flawed = {**row, "cot_solution": "\n".join([lines[0].rsplit(" ", 1)[0] + " 99999.", *lines[1:]])}
    proposals = flawed["cot_solution"].split("\n") if student_copies_the_flaw else lines
    monkeypatch.setattr(methods, "propose_lines",
                        lambda model, tokenizer, requests, max_tokens: [proposals[len(p)] for _, p in requests])
    groups, _ = encode_groups(tokenizer, [[flawed]], 1024)
    b = collate(groups, tokenizer.pad_token_id, seed=0)
    b.n_domains = 1
    metrics = vcd(model, tokenizer, beta=1.0, w_min=0.0).step(b)
    line_of = token_lines(tokenizer, flawed["cot_solution"])
    assert metrics["weight_mean"] == pytest.approx(sum(i != 0 for i in line_of) / len(line_of))
    if student_copies_the_flaw:  # the student's lines are the teacher's: both wrong on the first line
        assert metrics["v_student"] == metrics["v_teacher"] < 1.0


def test_vcd_trains_lora_with_real_proposals(tiny_base, tmp_path):
    from iga.train.loop import train

    model, tokenizer = student(tiny_base)
    tp = dataclasses.replace(P.train, steps=2, lr=1e-2, checkpoint_every=10)
    history = train(model, vcd(model, tokenizer, refresh=2), lambda s: [batch(tokenizer)], tp, tmp_path, "fp",
                    torch.device("cpu"))
    assert len(history) == 2 and history[1]["proposal_s"] < history[0]["proposal_s"]  # refresh 2: reused
    assert all(0 <= h["v_student"] <= 1 and h["v_teacher"] == 1.0 for h in history)
