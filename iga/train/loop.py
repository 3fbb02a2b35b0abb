"""The training loop, top to bottom: micro-batches → method.step → (data-parallel: the ranks' gradient
shares summed) → AdamW with warm-up + cosine, checkpoints, resume, and a hard stop on a non-finite loss."""
from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from iga.errors import TrainingError
from iga.hardware import resolve_precision
from iga.io import atomic_file
from iga.params import TrainParams
from iga.train.distributed import World
from iga.train.methods import Method
from iga.train.sft import Batch

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear warm-up over ceil(warmup_frac·total) steps, then cosine decay to 0 at `total`."""
    warmup = math.ceil(warmup_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a kill mid-write leaves the previous checkpoint intact."""
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint of this exact run (same fingerprint), or None: a stale one is ignored."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)  # tensors, numbers and strings only
    if state.get("fingerprint") != fingerprint:
        log.warning("%s belongs to another configuration or data; starting from step 0", path)
        return None
    return state


def resume_point(checkpoint_dir: Path, fingerprint: str) -> tuple[int, dict[str, Any]]:
    """The step this run would resume at (0: from scratch) and the caller's state stored with it."""
    state = load_checkpoint(checkpoint_dir / CHECKPOINT, fingerprint)
    return (0, {}) if state is None else (state["step"], state["extra"])


def train(model: torch.nn.Module, method: Method, micro_batches: Callable[[int], list[Batch]], tp: TrainParams,
          checkpoint_dir: Path, fingerprint: str, device: torch.device,
          on_step: Callable[[dict[str, float]], None] | None = None, extra_state: dict[str, Any] | None = None,
          world: World = World()) -> list[dict[str, float]]:
    """Run `tp.steps` optimizer steps, resuming from `checkpoint_dir` when it holds this run's state.

    `micro_batches(step)` gives that step's micro-batches (a pure function of the step, so a resumed
    run sees the same data). `extra_state` is stored with each checkpoint (the caller keeps e.g. its
    tracking run id there; `resume_point` reads it back). Returns the per-step history.
    Data-parallel (`world`), `micro_batches` gives this rank's share and the method the global losses;
    every rank then holds the same parameters and optimizer state, and rank 0 alone writes checkpoints
    and sends its checkpoint to the others on resume (the state is the same whatever the number of ranks).
    """
    params = trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=tp.lr, betas=(tp.beta1, tp.beta2), weight_decay=tp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tp.steps, tp.warmup_frac))
    path = checkpoint_dir / CHECKPOINT
    history: list[dict[str, float]] = []
    start, saved = 0, None  # saved: the step the checkpoint on disk resumes at
    # rank 0's checkpoint for every rank: on several machines only rank 0's disk holds it
    state = world.share(load_checkpoint(path, fingerprint) if world.main else None)
    if state is not None:
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["step"]
        saved = start
        log.info("resumed from %s at step %d", path, start)
    world.broadcast(list(params.values()))  # every rank starts from rank 0's weights, as DDP does
    bf16 = resolve_precision(tp.precision, device) == "bfloat16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    model.train()
    for step in range(start, tp.steps):
        t0 = time.perf_counter()
        if method.begin_step(step, tp.steps):
            optimizer.state.clear()  # fresh Adam moments, same lr schedule (IRM/V-REx at the penalty switch)
        totals: dict[str, float] = {}
        micro = micro_batches(step)
        for batch in micro:
            with autocast:
                metrics = method.step(batch.to(device))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / len(micro)
        if not math.isfinite(totals["loss"]):
            kept = f"the last good checkpoint {path} (step {saved}) is kept" if saved is not None else "no checkpoint yet"
            raise TrainingError(f"step {step}: the loss is {totals['loss']}; stopping ({kept})")
        world.sum_grads(list(params.values()))
        for p in params.values():
            if p.grad is not None and len(micro) > 1:
                p.grad /= len(micro)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "lr": lr, "step_time_s": time.perf_counter() - t0, **totals}
        history.append(record)
        if on_step is not None:
            on_step(record)
        if world.main and ((step + 1) % tp.checkpoint_every == 0 or step + 1 == tp.steps):
            save_checkpoint(path, {"fingerprint": fingerprint, "step": step + 1, "history": history,
                                   "extra": extra_state or {},
                                   "params": {n: p.detach().cpu() for n, p in params.items()},
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
            saved = step + 1
    return history


def summarize(method: str, history: list[dict[str, float]], extra: dict[str, Any]) -> dict[str, Any]:
    # One batch's loss is noisy (problems differ in difficulty): compare the first and last quarters.
    quarter = max(1, len(history) // 4)
    summary = {"method": method, "steps": len(history),
               "loss_first_quarter": statistics.fmean(h["loss"] for h in history[:quarter]),
               "loss_last_quarter": statistics.fmean(h["loss"] for h in history[-quarter:]),
               "step_time_s_median": statistics.median(h["step_time_s"] for h in history), **extra}
    for key in ("mask_mean", "mask_frac_below_half", "vhat_mean", "proj_residual"):
        if key in history[0]:
            summary[f"{key}_avg"] = statistics.fmean(h[key] for h in history)
    return summary
