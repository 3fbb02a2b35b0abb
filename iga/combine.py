"""Gradient-combination rules and invariance penalties of the baselines, as pure functions.

The rules take per-domain gradients `grads` of shape (N, P) (N domains, P parameters of one
parameter tensor, flattened) and return one update direction (P,); the masks rescale per tensor,
as DomainBed does per parameter, so call them once per LoRA tensor. The penalties take per-domain
losses. Sources: PCGrad (Yu et al., 2020), AND-mask (Parascandolo et al., 2021), SAND-mask
(Shahtalebi et al., 2021) and IRM / V-REx as in DomainBed's algorithms.py, MGDA (Sener & Koltun,
2018) for Pareto-GS.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

EPS = 1e-12


def pcgrad_projections(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each domain's gradient with the components that conflict with the other domains' *original*
    gradients projected away, the others taken in a random order per domain: (N, P)."""
    n = grads.shape[0]
    out = grads.clone()
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i:
                continue
            dot, norm2 = out[i] @ grads[j], grads[j] @ grads[j]
            if dot < 0 and norm2 > 0:  # norm2 can underflow to 0 in float32 where dot does not
                out[i] -= dot / norm2 * grads[j]
    return out


def pcgrad(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's update: the sum of the projected per-domain gradients (P,)."""
    return pcgrad_projections(grads, generator).sum(dim=0)


def _rescaled_mean(grads: Tensor, mask: Tensor) -> Tensor:
    """mask * mean gradient, divided by the mask's mean so that the update keeps its scale."""
    return mask * grads.mean(dim=0) / (mask.mean() + 1e-10)


def agreement_mask(grads: Tensor, tau: float) -> Tensor:
    """1 where the domains' gradient signs agree (|mean sign| >= tau; at tau = 1, unanimous), else 0."""
    return (grads.sign().mean(dim=0).abs() >= tau).to(grads.dtype)


def and_mask(grads: Tensor, tau: float) -> Tensor:
    """AND-mask: keep the coordinates whose gradient sign agrees across at least a `tau` share of
    domains (|mean sign| >= tau), zero the rest."""
    return _rescaled_mean(grads, agreement_mask(grads, tau))


def sand_mask(grads: Tensor, tau: float, k: float) -> Tensor:
    """SAND-mask, DomainBed's formula: mask = max(tanh(k / var * (|mean sign| - tau)), 0). A smooth
    AND-mask: agreement beyond tau, sharper where the domains' gradients vary less. tau must be in
    (0, 1): at tau = 1 no coordinate can exceed it and the mask is all zero."""
    if not 0 < tau < 1:
        raise ValueError(f"sand_mask: tau must be in (0, 1), got {tau}")
    var = grads.var(dim=0, unbiased=True).clamp_min(1e-17)
    mask = torch.tanh(k / var * (grads.sign().mean(dim=0).abs() - tau)).clamp_min(0)
    return _rescaled_mean(grads, mask)


def min_norm_weights(gram: Tensor, iters: int = 1000, tol: float = 1e-12) -> Tensor:
    """Convex weights a (N,) minimising ||a @ G|| given the Gram matrix G G^T: the closed form for two
    vectors; for more, Frank-Wolfe with exact line search (Sener & Koltun, 2018, Alg. 2) and away
    steps, which drop a dominated gradient's weight in one step where plain Frank-Wolfe shrinks it
    as 1/t (0.2 % above the minimum after 250 steps on a hand-made case)."""
    n = gram.shape[0]
    if n == 1:
        return gram.new_ones(1)
    if n == 2:
        denom = gram[0, 0] - 2 * gram[0, 1] + gram[1, 1]
        gamma = ((gram[1, 1] - gram[0, 1]) / denom).clamp(0, 1) if denom > EPS else gram.new_tensor(0.5)
        return torch.stack([gamma, 1 - gamma])
    a = gram.new_full((n,), 1.0 / n)
    eye = torch.eye(n, dtype=gram.dtype)
    for _ in range(iters):
        grad = gram @ a  # half the gradient of a^T M a
        t = int(torch.argmin(grad))
        support = torch.nonzero(a > 0).flatten()
        s = int(support[torch.argmax(grad[support])])
        value = a @ grad
        away = value - grad[t] < grad[s] - value  # moving away from the worst vertex in use gains more
        if away and a[s] >= 1:  # a vertex alone: only Frank-Wolfe can move
            away = False
        d, gamma_max = (a - eye[s], float(a[s] / (1 - a[s]))) if away else (eye[t] - a, 1.0)
        curvature = d @ gram @ d
        if curvature <= EPS:
            break
        gamma = float((-(d @ grad) / curvature).clamp(0, gamma_max))
        a = (a + gamma * d).clamp_min(0)
        if away and gamma >= gamma_max:  # a drop step: that vertex leaves the support exactly
            a[s] = 0.0
        elif gamma * float(d.abs().sum()) < tol:
            break
    return a / a.sum()


def mgda(grads: Tensor) -> Tensor:
    """Pareto-GS's direction: the min-norm point of the convex hull of the per-domain gradients (P,)."""
    weights = min_norm_weights(grads @ grads.T)
    return weights @ grads


def vrex_penalty(losses: Tensor) -> Tensor:
    """V-REx: the variance of the per-domain losses (N,); 0 when every domain has the same loss."""
    return losses.var(unbiased=False)


def irm_penalty(even_losses: Tensor, odd_losses: Tensor, scale: Tensor,
                total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """IRMv1 as in DomainBed. `scale` (N,) is a dummy classifier, one per domain, that multiplies that
    domain's logits (requires_grad); `even_losses` and `odd_losses` (N,) are each domain's loss on its
    even and on its odd examples. Per domain, the product of the two losses' gradients w.r.t. its scale
    (an unbiased estimate of the squared gradient), averaged over domains. It is 0 where scale = 1 is
    already optimal for every domain, and differentiable for the outer step (create_graph).
    Data-parallel, `total` sums each rank's share of those gradients over ranks before the product."""
    grads_even = torch.autograd.grad(even_losses.sum(), scale, create_graph=True)[0]
    grads_odd = torch.autograd.grad(odd_losses.sum(), scale, create_graph=True)[0]
    if total is not None:
        grads_even, grads_odd = total(grads_even), total(grads_odd)
    return (grads_even * grads_odd).mean()
