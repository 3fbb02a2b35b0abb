"""The per-domain gradient engine, every method, and the training loop, on a tiny Llama (no download)."""
import dataclasses
import math

import pytest
import torch

from conftest import ROOT, isomer_rows
from iga.errors import TrainingError
from iga.params import IGAConfig, load_params
from iga.train.loop import CHECKPOINT, train
from iga.train.methods import METHODS, build_method, domain_means, token_losses
from iga.train.pergrad import lora_layers, per_domain_gradients
from iga.train.sft import Batch, GroupSampler, collate, encode_groups, isomer_groups
from iga.train.student import load_student

P = load_params(ROOT / "params.yaml")
DOMAINS = P.domains.train
N = len(DOMAINS)
# Every named configuration of params.yaml (the ablations included), plus IGA's N-pass form.
CONFIGS = {**P.methods, "iga-n-passes": dataclasses.replace(P.methods["iga"], passes="per_domain")}


@pytest.fixture(scope="module")
def rows():
    return isomer_rows(12)


def student(tiny_base, nonzero_b=True, seed=0):
    torch.manual_seed(seed)
    model, tokenizer = load_student(tiny_base, P.lora, seed=seed)
    if nonzero_b:  # PEFT starts B at 0, which makes every gradient of A vanish: test the general case
        with torch.no_grad():
            for layer in lora_layers(model):
                layer.B.normal_(0, 0.05)
    return model, tokenizer


def verifier():
    from iga.data.seeds import procedural_seeds
    from iga.data.teacher import make_teacher
    from iga.data.verify import make_verifier

    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": 12, "teacher.flaw_rate": 0.0})  # isomer_rows'
    return make_verifier(params, procedural_seeds(params.seeds), make_teacher(params))


def batches(tokenizer, rows, k=2):
    groups, too_long = encode_groups(tokenizer, isomer_groups(rows, DOMAINS, "rows"), 1024)
    assert too_long == 0
    sampler = GroupSampler(len(groups), k, seed=0)
    return lambda j: collate([groups[i] for i in sampler(j)], tokenizer.pad_token_id, seed=j)


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_one_pass_equals_n_separate_backward_passes(tiny_base, rows):
    model, tokenizer = student(tiny_base)
    batch = batches(tokenizer, rows)(0)
    layers = lora_layers(model)
    one_pass = {}
    with per_domain_gradients(layers, N, lambda layer, G: one_pass.__setitem__(layer.name, G)):
        domain_means(*token_losses(model, batch), N).mean().backward()
    assert len(one_pass) == len(layers) == 4 * model.config.num_hidden_layers
    k = batch.input_ids.shape[0] // N
    for d in range(N):  # the reference: autograd's own LoRA gradients of domain d's loss alone
        model.zero_grad(set_to_none=True)
        part = slice(d * k, (d + 1) * k)
        sub = Batch(batch.input_ids[part], batch.attention_mask[part], batch.labels[part], 1, 0)
        domain_means(*token_losses(model, sub), 1)[0].backward()
        for layer in layers:
            G, s = one_pass[layer.name][d], layer.scaling
            for mine, ref in ((s * layer.B.T @ G, layer.A.grad), (s * G @ layer.A.T, layer.B.grad)):
                torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_iga_one_pass_and_n_passes_give_the_same_update(tiny_base, rows):
    grads = {}
    for name in ("iga", "iga-n-passes"):
        model, tokenizer = student(tiny_base)
        metrics = build_method(CONFIGS[name], model, DOMAINS).step(batches(tokenizer, rows)(0))
        grads[name] = (lora_grads(model), metrics)
    (g1, m1), (g2, m2) = grads["iga"], grads["iga-n-passes"]
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-3, atol=1e-4 * float(g2[n].abs().max()))


@pytest.mark.parametrize("name, calls", [("iga", {"conflict_mask", "project_to_lora"}),
                                         ("iga-and-mask", {"agreement_mask", "project_to_lora"})])
def test_iga_trains_with_the_functions_the_property_tests_check(tiny_base, rows, monkeypatch, name, calls):
    """IGA's step runs iga.core's conflict_mask and project_to_lora (and the AND-mask ablation
    iga.combine's agreement_mask, the mask of and_mask): not private copies of them."""
    import iga.combine
    import iga.train.methods

    seen = set()
    for owner, function in ((iga.train.methods, "conflict_mask"), (iga.train.methods, "project_to_lora"),
                            (iga.combine, "agreement_mask")):
        real = getattr(owner, function)
        monkeypatch.setattr(owner, function, lambda *a, _f=function, _real=real, **k: seen.add(_f) or _real(*a, **k))
    model, tokenizer = student(tiny_base)
    build_method(P.methods[name], model, DOMAINS).step(batches(tokenizer, rows)(0))
    assert seen == calls


@pytest.mark.parametrize("name", ["iga-no-proj", "iga-factor-mask", "iga-and-mask"])
def test_identical_domains_make_iga_equal_erm(tiny_base, rows, name):
    """Every domain slot holds the same instance: V = 0, M = 1 (the AND-mask: all signs agree), and IGA
    without projection is ERM; so is masking the LoRA factor gradients directly."""
    model, tokenizer = student(tiny_base)
    batch = batches(tokenizer, rows)(0)
    k = batch.input_ids.shape[0] // N
    same = Batch(*(t[:k].repeat(N, 1) for t in (batch.input_ids, batch.attention_mask, batch.labels)), N, 0)
    ERM = build_method(P.methods["erm"], model, DOMAINS)
    ERM.step(same)
    erm = lora_grads(model)
    model.zero_grad(set_to_none=True)
    config = P.methods[name]
    if config.mask == "and":  # with projection: compare with ERM's gradient projected by the sound IGA
        config = dataclasses.replace(config, projection="none")
    metrics = build_method(config, model, DOMAINS).step(same)
    if config.mask == "exp":
        assert metrics["mask_mean"] == pytest.approx(1.0, abs=1e-6)
    for n, g in lora_grads(model).items():
        torch.testing.assert_close(g, erm[n], rtol=1e-4, atol=1e-5 * float(erm[n].abs().max()))


@pytest.mark.parametrize("name, factor", [("pcgrad", N), ("pareto-gs", 1), ("and-mask", 1), ("sand-mask", 1)])
def test_identical_domains_make_every_gradient_rule_erm(tiny_base, rows, name, factor):
    """Every domain slot holds the same instance: nothing conflicts or disagrees, so PCGrad is the sum of
    N equal gradients (N x ERM's mean) and MGDA, AND- and SAND-mask are ERM's gradient."""
    model, tokenizer = student(tiny_base)
    batch = batches(tokenizer, rows)(0)
    k = batch.input_ids.shape[0] // N
    same = Batch(*(t[:k].repeat(N, 1) for t in (batch.input_ids, batch.attention_mask, batch.labels)), N, 0)
    build_method(P.methods["erm"], model, DOMAINS).step(same)
    erm = lora_grads(model)
    model.zero_grad(set_to_none=True)
    build_method(P.methods[name], model, DOMAINS).step(same)
    for n, g in lora_grads(model).items():
        torch.testing.assert_close(g, factor * erm[n], rtol=1e-3, atol=1e-4 * float(erm[n].abs().max()))


@pytest.mark.parametrize("name", ["irm", "vrex"])
def test_penalty_weight_switches_and_adam_restarts(tiny_base, rows, tmp_path, name):
    """Weight 1 before anneal_frac of the steps, then penalty_weight; Adam's moments restart at the switch."""
    model, tokenizer = student(tiny_base, nonzero_b=False)
    config = dataclasses.replace(P.methods[name], penalty_weight=7.0, anneal_frac=0.5)
    tp = dataclasses.replace(P.train, steps=4, lr=1e-2, checkpoint_every=10)
    history = train(model, build_method(config, model, DOMAINS), lambda s: [batches(tokenizer, rows)(s)], tp,
                    tmp_path, "fp", torch.device("cpu"))
    assert [h["penalty_weight"] for h in history] == [1.0, 1.0, 7.0, 7.0]
    assert all(h["penalty"] >= 0 and math.isfinite(h["penalty"]) for h in history)
    adam = torch.load(tmp_path / CHECKPOINT, weights_only=True)["optimizer"]["state"]
    assert {int(v["step"]) for v in adam.values()} == {2}  # two updates since the restart, not four


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_method_trains_lora_and_nothing_else(tiny_base, rows, tmp_path, name):
    assert CONFIGS[name].kind in METHODS
    model, tokenizer = student(tiny_base, nonzero_b=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tp = dataclasses.replace(P.train, steps=3, lr=1e-2, checkpoint_every=10)
    method = build_method(CONFIGS[name], model, DOMAINS, tokenizer, verifier())  # VCD reads and verifies lines
    history = train(model, method, lambda s: [batches(tokenizer, rows)(s)], tp, tmp_path, "fp", torch.device("cpu"))
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == ("lora_" in n), n
    if CONFIGS[name].kind == "iga":
        h = history[-1]
        assert 0 < h["mask_mean"] <= 1 and 0 <= h["mask_frac_below_half"] <= 1 and h["vhat_mean"] >= 0
        assert ("proj_residual" in h) == (CONFIGS[name].projection != "none")


def _eval_loss(model, batch_fn, n=4):
    with torch.no_grad():
        return sum(float(domain_means(*token_losses(model, batch_fn(j)), N).mean()) for j in range(n)) / n


@pytest.mark.parametrize("name", ["erm", "iga"])
def test_short_training_lowers_the_loss(tiny_base, rows, tmp_path, name):
    model, tokenizer = student(tiny_base, nonzero_b=False)
    batch_fn = batches(tokenizer, rows)
    start = _eval_loss(model, batch_fn)
    tp = dataclasses.replace(P.train, steps=25, lr=1e-2, checkpoint_every=100)
    train(model, build_method(P.methods[name], model, DOMAINS), lambda s: [batch_fn(s)], tp, tmp_path, "fp",
          torch.device("cpu"))
    end = _eval_loss(model, batch_fn)
    assert end < start - 0.5, (start, end)


def _run(tiny_base, rows, ckpt, on_step=None, steps=8):
    model, tokenizer = student(tiny_base, nonzero_b=False)
    tp = dataclasses.replace(P.train, steps=steps, lr=1e-2, checkpoint_every=3, grad_accum=2)
    batch_fn = batches(tokenizer, rows)
    method = build_method(P.methods["iga"], model, DOMAINS)
    history = train(model, method, lambda s: [batch_fn(2 * s), batch_fn(2 * s + 1)], tp, ckpt, "fp",
                       torch.device("cpu"), on_step=on_step)
    return model, history


def test_resume_after_interruption_ends_with_the_same_adapter(tiny_base, rows, tmp_path):
    reference, ref_history = _run(tiny_base, rows, tmp_path / "a")

    def crash(record):
        if record["step"] == 4:  # checkpoints hold steps 0-2; steps 3-4 are lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_base, rows, tmp_path / "b", on_step=crash)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["step"] == 3
    resumed, history = _run(tiny_base, rows, tmp_path / "b")
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    ref = dict(reference.named_parameters())
    for n, p in resumed.named_parameters():
        assert torch.equal(p, ref[n]), n


def test_a_stale_checkpoint_is_not_resumed(tiny_base, rows, tmp_path):
    _run(tiny_base, rows, tmp_path, steps=3)
    model, tokenizer = student(tiny_base, nonzero_b=False)
    tp = dataclasses.replace(P.train, steps=3, lr=1e-2, checkpoint_every=3)
    history = train(model, build_method(P.methods["erm"], model, DOMAINS),
                       lambda s: [batches(tokenizer, rows)(s)], tp, tmp_path, "another-config", torch.device("cpu"))
    assert len(history) == 3  # trained from step 0, not "already done"


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_base, rows, tmp_path, monkeypatch):
    original = METHODS["iga"].step
    calls = []

    def step(self, batch):
        calls.append(1)
        metrics = original(self, batch)
        return {**metrics, "loss": math.nan} if len(calls) == 11 else metrics  # micro-batch 11 = step 5

    monkeypatch.setattr(METHODS["iga"], "step", step)
    with pytest.raises(TrainingError, match=r"step 5: the loss is nan.*last good checkpoint .*step 3"):
        _run(tiny_base, rows, tmp_path)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 3


def test_lora_dropout_is_refused_for_per_domain_gradients(tiny_base):
    model, _ = load_student(tiny_base, dataclasses.replace(P.lora, dropout=0.1))
    with pytest.raises(ValueError, match="lora_dropout = 0"):
        lora_layers(model)


def test_groups_per_batch_larger_than_the_data_is_a_clear_error():
    with pytest.raises(Exception, match="train.groups_per_batch"):
        GroupSampler(3, 4, 0)


def test_iga_config_in_params_has_both_variants():
    assert P.methods["iga"] == IGAConfig("iga", 0.5, "exact", "relative", "chain_rule", "exp", 10, "one")
    assert P.methods["iga-paper"] == IGAConfig("iga", 0.5, "factor", "none", "svd_factors", "exp", 10, "one")
