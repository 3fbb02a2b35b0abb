"""Training methods behind one interface (as DomainBed's algorithms.py), and their registry.

`Method.step(batch)` runs forward and backward on one micro-batch, ADDS the gradients of the
trainable (LoRA) parameters into their `.grad` (so the trainer can accumulate micro-batches), and
returns scalar metrics. The trainer owns the optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iga.core import lora_factor_grads, normalized_variance, projection_residual, randomized_svd, reconstruct
from iga.params import ERMConfig, IGAConfig, MethodConfig
from iga.pergrad import LoraLayer, lora_layers, per_domain_gradients
from iga.sft import IGNORE, Batch


def token_losses(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-row sum of next-token losses over labelled tokens, and their count."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="none").view(labels.shape)
    return loss.sum(dim=1), (labels != IGNORE).sum(dim=1)


def domain_means(sums: Tensor, counts: Tensor, n_domains: int) -> Tensor:
    """Each domain's mean token loss (N,), from a domain-major batch."""
    return sums.view(n_domains, -1).sum(dim=1) / counts.view(n_domains, -1).sum(dim=1).clamp(min=1)


class Method:
    def __init__(self, model: nn.Module, config: MethodConfig, domains: tuple[str, ...]):
        self.model, self.config, self.domains = model, config, domains

    def step(self, batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    def _domain_metrics(self, per_domain: Tensor) -> dict[str, float]:
        return {f"loss/{d}": float(v) for d, v in zip(self.domains, per_domain.detach())}


class ERM(Method):
    """ERM-SFT: the plain mean token loss over the whole batch, no group structure."""

    def step(self, batch: Batch) -> dict[str, float]:
        sums, counts = token_losses(self.model, batch)
        loss = sums.sum() / counts.sum().clamp(min=1)
        loss.backward()
        return {"loss": loss.item(), **self._domain_metrics(domain_means(sums, counts, batch.n_domains))}


@dataclass
class _MaskStats:
    """Element-weighted over all LoRA modules: is the mask inert (≈1), killing (≈0) or discriminating?"""
    elements: int = 0
    mask_sum: float = 0.0
    below_half: int = 0
    vhat_sum: float = 0.0
    residuals: list[float] = field(default_factory=list)

    def add(self, mask: Tensor, vhat: Tensor, residual: float | None) -> None:
        self.elements += mask.numel()
        self.mask_sum += float(mask.sum())
        self.below_half += int((mask < 0.5).sum())
        self.vhat_sum += float(vhat.sum())
        if residual is not None:
            self.residuals.append(residual)

    def metrics(self) -> dict[str, float]:
        out = {"mask_mean": self.mask_sum / self.elements, "mask_frac_below_half": self.below_half / self.elements,
               "vhat_mean": self.vhat_sum / self.elements}
        if self.residuals:
            out["proj_residual"] = sum(self.residuals) / len(self.residuals)
        return out


class IGA(Method):
    """Invariant Gradient Alignment (paper Algorithm 1), module by module:
    per-domain gradients → reconstruction → conflict mask → masked mean → rank-r projection."""
    config: IGAConfig

    def __init__(self, model: nn.Module, config: IGAConfig, domains: tuple[str, ...]):
        super().__init__(model, config, domains)
        self.layers = lora_layers(model)
        self.index = {layer.name: i for i, layer in enumerate(self.layers)}

    def _combine(self, layer: LoraLayer, G: Tensor, seed: int, stats: _MaskStats) -> tuple[Tensor, Tensor]:
        c = self.config
        # One generator per (micro-batch, module): the draws do not depend on the order modules arrive in.
        generator = torch.Generator(device=G.device).manual_seed(seed * 100_003 + self.index[layer.name])
        A, B, s = layer.A.detach().float(), layer.B.detach().float(), layer.scaling
        with torch.autocast(G.device.type, enabled=False):  # the IGA math runs in fp32 under bf16 autocast
            mean, vhat = normalized_variance(reconstruct(G, A, B, s, c.reconstruction), c.mask_normalize)
            mask = torch.exp(-c.tau * vhat)
            g = mean * mask
            low = None if c.projection == "none" else randomized_svd(g, A.shape[0], c.oversample, generator=generator)
            stats.add(mask, vhat, None if low is None else projection_residual(g, low))
            return lora_factor_grads(g, low, A, B, s, c.projection)

    def step(self, batch: Batch) -> dict[str, float]:
        n = batch.n_domains
        stats, grads = _MaskStats(), {}
        # Autograd fills the LoRA .grad too; IGA's gradient replaces that part, keeping what earlier
        # micro-batches accumulated.
        accumulated = {}
        for layer in self.layers:
            for param in (layer.A, layer.B):
                accumulated[param], param.grad = param.grad, None

        def combine(layer: LoraLayer, G: Tensor) -> None:
            grads[layer.name] = self._combine(layer, G, batch.seed, stats)

        if self.config.passes == "one":
            with per_domain_gradients(self.layers, n, combine):
                per_domain = domain_means(*token_losses(self.model, batch), n)
                per_domain.mean().backward()
        else:  # the paper's way: one forward+backward per domain, every module's N buffers held at once
            collected: dict[str, list[Tensor]] = {layer.name: [] for layer in self.layers}
            losses = []
            rows = batch.input_ids.shape[0] // n
            for d in range(n):
                part = slice(d * rows, (d + 1) * rows)
                sub = Batch(batch.input_ids[part], batch.attention_mask[part], batch.labels[part], 1, batch.seed)
                with per_domain_gradients(self.layers, 1, lambda layer, G: collected[layer.name].append(G[0])):
                    loss = domain_means(*token_losses(self.model, sub), 1)[0]
                    loss.backward()
                losses.append(loss.detach())
            for layer in self.layers:
                combine(layer, torch.stack(collected.pop(layer.name)))
            per_domain = torch.stack(losses)
        for layer in self.layers:
            for param, new in zip((layer.A, layer.B), grads[layer.name]):
                before = accumulated[param]
                param.grad = new.to(param.dtype) if before is None else before + new.to(param.dtype)
        return {"loss": per_domain.mean().item(), **self._domain_metrics(per_domain), **stats.metrics()}


METHODS: dict[str, type[Method]] = {"erm": ERM, "iga": IGA}


def build_method(config: MethodConfig, model: nn.Module, domains: tuple[str, ...]) -> Method:
    return METHODS[config.kind](model, config, domains)
