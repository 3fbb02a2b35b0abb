"""A few training steps of each method on the tiny student, as one rank of a torchrun launch (or as the
single process when called from a test): tests/test_distributed.py compares the two.

    torchrun --standalone --nproc_per_node 2 tests/ddp_ranks.py BASE OUT erm,iga [--die-at STEP] [--dtype D]
                                                                                 [--mutate drop-reduce]
    python tests/ddp_ranks.py BASE OUT erm,iga [--reorder]    # the single process (the test's reference)

Rank 0 writes OUT/<method>.safetensors, the LoRA tensors after STEPS steps, OUT/<method>.start.safetensors,
before the first step, and OUT/<method>.grad0.safetensors, the global gradient of step 0 as the optimizer saw
it (not when the run resumed past step 0). With --reorder, every micro-batch is as `other_order` gives it.
The student runs in float64 unless --dtype says otherwise: the same computation in another summation order
(another CPU, another split of the batch) then differs by ~1e-16 of each sum, where float32's 1e-7 can flip
a sign mask or the sign of a near-zero gradient component, which Adam's first steps turn into ±lr.
With --die-at, rank 1 exits abruptly before that step (as a killed or crashed rank would).
With --mutate drop-reduce, the per-module reduce of IGA and of the gradient rules leaves the owner its own
share instead of the sum over ranks: the bug the equality test must catch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT, isomer_rows  # noqa: E402
from iga.data.seeds import procedural_seeds  # noqa: E402
from iga.data.teacher import make_teacher  # noqa: E402
from iga.data.verify import make_verifier  # noqa: E402
from iga.params import load_params  # noqa: E402
from iga.train import distributed  # noqa: E402
from iga.train.loop import resume_point, train, trainable  # noqa: E402
from iga.train.methods import build_method  # noqa: E402
from iga.train.pergrad import lora_layers  # noqa: E402
from iga.train.sft import IGNORE, Batch, batcher, encode_groups, isomer_groups  # noqa: E402
from iga.train.student import load_student  # noqa: E402

P = load_params(ROOT / "params.yaml")
STEPS, GROUPS_PER_BATCH, GRAD_ACCUM, N_SEEDS = 3, 2, 2, 12
DTYPE = "float64"


def distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """‖a − b‖ over all the tensors at once (one vector: the bound is for the whole adapter, not per tensor)."""
    assert a.keys() == b.keys()
    return math.sqrt(sum(float((a[n].double() - b[n].double()).norm()) ** 2 for n in a))


def norm(a: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.double().norm()) ** 2 for t in a.values()))


# How far a run may be from the single process when it is the same computation in other rounding (two ranks,
# another CPU): K times the noise, the distance of the single process's run with its micro-batches as
# `other_order` gives them (the same computation with other sums, measured on this CPU, not assumed), and
# never below FLOOR ulps of the norm.
# K: the two runs' distances from the single process are draws of one kind, of the same order; K leaves room
#    for two ranks changing more sums at once (the batch split, gloo's reduce, each rank's matrix shapes) than
#    one reordering does, and for a long tail: Adam divides by sqrt(v) + 1e-8, so a component whose gradient
#    is near 1e-8 multiplies its rounding error by ~lr / 4e-8, and one run's error there can be ~0 by chance.
#    Measured, two ranks / noise over the nine methods in float64 (AMD EPYC Zen 4): adapters 0.05-1.2 with
#    AVX-512 kernels, 0.6-30 with AVX2 ones (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2), 0.3-5
#    without SIMD (ATEN_CPU_CAPABILITY=default, SSE4.2); step 0's gradients 0.5-1.2 in all three. The train
#    flow's IGA in float32: 1.4 (other orders of its batches, padded 1-33 columns wider: 0.9-4.5 x its noise
#    run). K = 1000 leaves 30x over the largest seen, and the bound stays 1e-12 to 1e-10 of the norm in
#    float64: a missing reduce misses by 1e9 times more (test_a_missing_reduce_fails_the_check_by_orders_...).
#    In float32 the masks' ratio was 5.6e4 (a sign decided by rounding flipped in one run, not the other):
#    why test_distributed runs in float64, where such a flip is ~1e9 times rarer.
# FLOOR: a noise run that happens to come out (nearly) identical must not make the bound 0: 100 ulps of the
#    norm, above every two-rank distance measured where the noise was smallest (SAND-mask in float64: 0.3 ulps
#    for the adapter, 2.5 for step 0's gradient).
K, FLOOR = 1000, 100


def tolerance(noise: float, size: float, dtype: torch.dtype) -> float:
    return max(K * noise, FLOOR * torch.finfo(dtype).eps * size)


class Trained(NamedTuple):
    start: dict[str, Tensor]  # the LoRA tensors before the first step
    lora: dict[str, Tensor]  # ... after STEPS steps (the same on every rank)
    grad0: dict[str, Tensor] | None  # step 0's global gradient, as the optimizer saw it; None: resumed past it


class DropReduce(distributed.World):
    """A missing per-module reduce (the mutation the equality test must catch): the owner of a module runs
    IGA or a gradient rule on its own share of the per-domain gradients, not on their sum over ranks."""

    def reduce_to(self, t: Tensor, owner: int) -> Tensor | None:
        return t if self.rank == owner else None


def other_order(batch: Batch, pad_id: int, extra: int = 7) -> Batch:
    """The same micro-batch with each domain's groups in reverse order and `extra` more padding columns: the
    same computation (no method mixes rows but through sums; right padding carries no loss, and no real
    token attends to it or changes position), its sums in another order, its matrices in other shapes."""
    n = batch.n_domains
    k = batch.input_ids.shape[0] // n
    order = [d * k + i for d in range(n) for i in reversed(range(k))]

    def widen(t: Tensor, fill: int) -> Tensor:
        return torch.cat([t[order], t.new_full((t.shape[0], extra), fill)], dim=1)

    return Batch(widen(batch.input_ids, pad_id), widen(batch.attention_mask, 0), widen(batch.labels, IGNORE), n,
                 batch.seed, None if batch.sources is None else tuple(batch.sources[i] for i in order))


@contextlib.contextmanager
def float64_norms():
    """transformers' LlamaRMSNorm computes in float32 whatever its input, its backward too: in a float64 run
    it computes the same formula in float64, so that the whole path stays float64 (float32 and bf16 as ever)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    original = LlamaRMSNorm.forward

    def forward(self: LlamaRMSNorm, x: Tensor) -> Tensor:
        if x.dtype != torch.float64:
            return original(self, x)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    LlamaRMSNorm.forward = forward
    try:
        yield
    finally:
        LlamaRMSNorm.forward = original


@functools.cache
def rows() -> tuple[dict, ...]:
    return tuple(isomer_rows(N_SEEDS))


@functools.cache
def verifier():
    """VCD's step verifier over the seeds of `isomer_rows(N_SEEDS)`, as tasks/train.py makes it from the seeds."""
    params = load_params(ROOT / "params.yaml", overrides={"seeds.n": N_SEEDS, "teacher.flaw_rate": 0.0})
    return make_verifier(params, procedural_seeds(params.seeds), make_teacher(params))


def run(method: str, base: Path, checkpoints: Path, world: distributed.World, die_at: int | None = None, *,
        dtype: str = DTYPE, reorder: bool = False) -> Trained:
    """`method` trained STEPS steps on 12 isomer groups, the student in `dtype`; with `reorder`, every
    micro-batch as `other_order` gives it (one process: the noise reference)."""
    model, tokenizer = load_student(base, P.lora, seed=0)
    model.to(getattr(torch, dtype))
    with torch.no_grad():  # PEFT starts B at 0, which makes every gradient of A vanish: test the general case
        torch.manual_seed(1)
        for layer in lora_layers(model):
            layer.B.normal_(0, 0.05)
    groups, _ = encode_groups(tokenizer, isomer_groups(list(rows()), P.domains.train, "rows"), 1024)
    tp = dataclasses.replace(P.train, steps=STEPS, lr=1e-2, checkpoint_every=1, groups_per_batch=GROUPS_PER_BATCH,
                             grad_accum=GRAD_ACCUM, precision="float32")  # float32: no bf16 autocast
    shares = batcher(groups, tp, GROUPS_PER_BATCH, tokenizer.pad_token_id, world)

    def micro_batches(step: int):
        if world.rank == 1 and step == die_at:
            os._exit(3)  # no clean-up, no message: as SIGKILL or an out-of-memory kill
        return [other_order(b, tokenizer.pad_token_id) for b in shares(step)] if reorder else shares(step)

    config = P.methods[method]
    if config.kind == "vcd":  # the untrained student's proposed lines rarely end: cut them short, for time
        config = dataclasses.replace(config, max_line_tokens=8)
    impl = build_method(config, model, P.domains.train, tokenizer, verifier() if config.kind == "vcd" else None,
                        world=world)
    params = trainable(model)
    start = {n: p.detach().clone() for n, p in params.items()}
    fingerprint = f"ddp-test-{method}-{dtype}"
    names = {p: n for n, p in params.items()}
    grad0: dict[str, Tensor] = {}

    def first_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not grad0:  # the loop has summed the ranks' shares and averaged the micro-batches by now
            grad0.update({names[p]: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                          for group in optimizer.param_groups for p in group["params"]})

    fresh = resume_point(checkpoints / method, fingerprint)[0] == 0
    hook = register_optimizer_step_pre_hook(first_step)
    try:
        with float64_norms():
            train(model, impl, micro_batches, tp, checkpoints / method, fingerprint, torch.device("cpu"), world=world)
    finally:
        hook.remove()
    return Trained(start, {n: p.detach().clone() for n, p in params.items()}, grad0 if fresh else None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("methods")
    parser.add_argument("--die-at", type=int)
    parser.add_argument("--dtype", default=DTYPE, choices=["float64", "float32"])
    parser.add_argument("--mutate", choices=["drop-reduce"])
    parser.add_argument("--reorder", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)  # the loop's "resumed from ... at step N"
    torch.set_num_threads(1)
    world = distributed.join(torch.device("cpu"), timeout_s=60)
    if args.mutate == "drop-reduce":
        world = DropReduce(world.rank, world.size, world.local_size)
    for name in args.methods.split(","):
        trained = run(name, args.base, args.out / "checkpoints", world, args.die_at, dtype=args.dtype,
                      reorder=args.reorder)
        if world.main:
            save_file(trained.start, str(args.out / f"{name}.start.safetensors"))
            save_file(trained.lora, str(args.out / f"{name}.safetensors"))
            if trained.grad0 is not None:
                save_file(trained.grad0, str(args.out / f"{name}.grad0.safetensors"))
