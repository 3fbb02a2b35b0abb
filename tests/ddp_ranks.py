"""A few training steps of each method on the tiny student, as one rank of a torchrun launch (or as the
single process when called from a test): tests/test_distributed.py compares the two.

    torchrun --standalone --nproc_per_node 2 tests/ddp_ranks.py BASE OUT erm,iga [--die-at STEP]

With --die-at, rank 1 exits abruptly before that step (as a killed or crashed rank would).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT, isomer_rows  # noqa: E402
from iga.params import load_params  # noqa: E402
from iga.train import distributed  # noqa: E402
from iga.train.loop import train, trainable  # noqa: E402
from iga.train.methods import build_method  # noqa: E402
from iga.train.pergrad import lora_layers  # noqa: E402
from iga.train.sft import batcher, encode_groups, isomer_groups  # noqa: E402
from iga.train.student import load_student  # noqa: E402

P = load_params(ROOT / "params.yaml")
STEPS, GROUPS_PER_BATCH, GRAD_ACCUM = 3, 2, 2


def run(method: str, base: Path, checkpoints: Path, world: distributed.World, die_at: int | None = None
        ) -> dict[str, torch.Tensor]:
    """`method` trained STEPS steps on 12 isomer groups; returns the LoRA tensors (the same on every rank)."""
    model, tokenizer = load_student(base, P.lora, seed=0)
    with torch.no_grad():  # PEFT starts B at 0, which makes every gradient of A vanish: test the general case
        torch.manual_seed(1)
        for layer in lora_layers(model):
            layer.B.normal_(0, 0.05)
    groups, _ = encode_groups(tokenizer, isomer_groups(isomer_rows(12), P.domains.train, "rows"), 1024)
    tp = dataclasses.replace(P.train, steps=STEPS, lr=1e-2, checkpoint_every=1, groups_per_batch=GROUPS_PER_BATCH,
                             grad_accum=GRAD_ACCUM, precision="float32")
    shares = batcher(groups, tp, GROUPS_PER_BATCH, tokenizer.pad_token_id, world)

    def micro_batches(step: int):
        if world.rank == 1 and step == die_at:
            os._exit(3)  # no clean-up, no message: as SIGKILL or an out-of-memory kill
        return shares(step)

    impl = build_method(P.methods[method], model, P.domains.train, world=world)
    train(model, impl, micro_batches, tp, checkpoints / method, f"ddp-test-{method}", torch.device("cpu"),
          world=world)
    return {n: p.detach().clone() for n, p in trainable(model).items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("methods")
    parser.add_argument("--die-at", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)  # the loop's "resumed from ... at step N"
    torch.set_num_threads(1)
    world = distributed.join(torch.device("cpu"), timeout_s=60)
    for name in args.methods.split(","):
        lora = run(name, args.base, args.out / "checkpoints", world, args.die_at)
        if world.main:
            save_file(lora, str(args.out / f"{name}.safetensors"))
