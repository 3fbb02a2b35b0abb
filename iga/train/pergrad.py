"""Every domain's exact full-weight gradient of every LoRA-wrapped linear, in ONE forward+backward.

For a linear y = x·W_effᵀ the weight gradient is Σ_t δ_tᵀ·x_t over tokens t (δ = dL/dy). A
forward hook keeps the module's input x; a hook on its output receives δ during the backward
pass. With the batch laid out domain-major (rows [domain 0 × K, domain 1 × K, …]) and the loss
L = (1/N)·Σ_n L_n (each sample only reaches its own domain's loss), the gradient of domain n's
loss is G_n = N·Σ_{t in domain n} δ_tᵀ·x_t, one batched matmul per module. Modules are handled one
at a time as their δ arrives, so only one module's N × out × in buffer lives at once.

This needs lora_dropout = 0: with dropout the LoRA branch sees a different x than the base layer.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LoraLayer:
    name: str
    module: nn.Module  # a peft LoRA Linear

    @property
    def adapter(self) -> str:
        return self.module.active_adapters[0]

    @property
    def A(self) -> nn.Parameter:  # (r, in)
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:  # (out, r)
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """The LoRA-wrapped linears of a peft model, in module order; refuses LoRA dropout."""
    layers = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and module.active_adapters:
            dropout = module.lora_dropout[module.active_adapters[0]]
            if not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0) > 0:
                raise ValueError(f"{name}: per-domain gradients need lora_dropout = 0, got {dropout.p}")
            layers.append(LoraLayer(name, module))
    if not layers:
        raise ValueError("the model has no LoRA-wrapped linear layers")
    return layers


def at_least_fp32(t: Tensor) -> Tensor:
    """`t` in float32, or as it is where its dtype is wider (float64): the IGA math and the losses run in
    float32 under bf16 autocast, as `.float()` would give (the very tensor where it is float32 already),
    and a float64 model (the data-parallel tests) stays float64 throughout."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@contextmanager
def per_domain_gradients(layers: list[LoraLayer], n_domains: int,
                         on_module: Callable[[LoraLayer, Tensor], None]) -> Iterator[None]:
    """While active, each backward pass calls `on_module(layer, G)` once per layer, G = (N, out, in)
    in float32 (float64 for a float64 model): the gradient of each domain's mean loss w.r.t. the layer's
    effective weight.

    The batch must be domain-major with the same number of rows per domain, and the loss the mean
    of the per-domain mean losses.
    """
    def forward_hook(layer: LoraLayer):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = inputs[0].detach()
            if x.shape[0] % n_domains:
                raise ValueError(f"batch of {x.shape[0]} rows is not {n_domains} domains × K groups")

            def grad_hook(delta: Tensor) -> None:
                # fp32 even under bf16 autocast: these sums feed a variance and an SVD
                with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                    xs = at_least_fp32(x.reshape(n_domains, -1, x.shape[-1]))
                    ds = at_least_fp32(delta.reshape(n_domains, -1, delta.shape[-1]))
                    on_module(layer, (ds.transpose(1, 2) @ xs).mul_(n_domains))  # in place: one buffer, not two

            output.register_hook(grad_hook)
        return hook

    handles = [layer.module.register_forward_hook(forward_hook(layer)) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
