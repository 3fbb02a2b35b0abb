"""Precision is detected, not assumed: bf16 only where the hardware multiplies it natively; bf16
autocast training runs on the CPU too (the path AMX machines take)."""
import dataclasses
import math

import pytest
import torch

from iga import hardware


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "float32"), ({"avx2", "avx512f"}, "float32"),
                                             ({"avx512f", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16")])
def test_auto_picks_bf16_only_where_it_is_native(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert hardware.resolve_precision("auto", cpu) == expected
    assert hardware.resolve_precision("float32", cpu) == "float32"  # an explicit setting is kept
    assert hardware.resolve_precision("bfloat16", cpu) == "bfloat16"


def test_this_machine_is_described():
    text = hardware.describe(torch.device("cpu"))
    assert text.startswith("cpu (") and any(f in text for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "no avx2"))


@pytest.mark.parametrize("name", ["erm", "iga"])
def test_bf16_autocast_trains_on_the_cpu(tiny_base, tmp_path, name):
    from conftest import ROOT, isomer_rows
    from iga.params import load_params
    from iga.train.loop import train
    from iga.train.methods import build_method
    from iga.train.sft import collate, encode_groups, isomer_groups
    from iga.train.student import load_student

    params = load_params(ROOT / "params.yaml")
    domains = params.domains.train
    losses = {}
    for precision in ("float32", "bfloat16"):
        model, tokenizer = load_student(tiny_base, params.lora, seed=0)
        groups, _ = encode_groups(tokenizer, isomer_groups(isomer_rows(2), domains, "x"), 1024)
        tp = dataclasses.replace(params.train, steps=2, lr=1e-2, checkpoint_every=10, precision=precision)
        history = train(model, build_method(params.methods[name], model, domains),
                        lambda s: [collate(groups[:1], tokenizer.pad_token_id, seed=s)], tp, tmp_path / precision,
                        "fp", torch.device("cpu"))
        assert all(math.isfinite(h["loss"]) for h in history)
        losses[precision] = history[0]["loss"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)  # the same step, in bf16
