"""The IGA update for one LoRA module, as plain tensor functions (paper §3.4–3.5, Algorithm 1).

Conventions (PEFT): `A` is lora_A.weight, shape (r, in); `B` is lora_B.weight, shape (out, r);
ΔW = s·B·A with s = `scaling` = α/r. For the full-weight gradient G = dL/dW (out, in), the chain
rule gives dL/dA = s·Bᵀ·G and dL/dB = s·G·Aᵀ.

Pipeline per module: per-domain gradients ĝ_n (`reconstruct`) → mean ḡ and conflict mask
M = exp(−τ·V̂) (`conflict_mask`) → g = ḡ ⊙ M → rank-r projection and LoRA factor gradients
(`project_to_lora`). Each step has the paper-literal variant and the sound one; see
`RECONSTRUCTIONS`, `NORMALIZATIONS`, `PROJECTIONS`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# factor: the paper's ĝ = g^B·Aᵀ + Bᵀ·g^A has mismatched shapes; its sensible reading is the
#         first-order change of ΔW from a factor step, s·(g_B·A + B·g_A), of rank ≤ 2r.
# exact:  the full-weight gradient G itself (the per-domain engine computes it in the same pass).
RECONSTRUCTIONS = ("factor", "exact")
# none:     V as is. On raw gradients (|g| ~ 1e-4, V ~ 1e-8) exp(−τV) ≈ 1: the mask is inert.
# relative: V / (mean over the module of ḡ² + ε), which is scale-free.
NORMALIZATIONS = ("none", "relative")
# svd_factors: the paper's ∇B = U·√Σ, ∇A = √Σ·Vᵀ (with a deterministic sign convention); not a
#              descent direction in general.
# chain_rule:  P = rank-r projection of g; ∇A = s·Bᵀ·P, ∇B = s·P·Aᵀ (always a descent direction).
# none:        the chain rule on g itself, no subspace projection (the ablation "w/o projection").
PROJECTIONS = ("svd_factors", "chain_rule", "none")

EPS = 1e-30  # below any float32 squared gradient that matters, above 0


def reconstruct(G: Tensor, A: Tensor, B: Tensor, scaling: float, mode: str) -> Tensor:
    """Full-weight gradient estimate (..., out, in) from the full-weight gradient G (..., out, in)."""
    if mode == "exact":
        return G
    if mode == "factor":
        grad_A = scaling * (B.T @ G)  # (..., r, in)
        grad_B = scaling * (G @ A.T)  # (..., out, r)
        return scaling * (grad_B @ A + B @ grad_A)
    raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {mode!r}")


def normalized_variance(grads: Tensor, normalize: str = "relative", eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Mean ḡ and per-element cross-domain variance V̂ (population, 1/N) of `grads` (N, *shape)."""
    mean = grads.mean(dim=0)
    var = (grads - mean).square_().mean(dim=0)  # Tensor.var(dim=0) is ~30x slower on CPU here
    if normalize == "relative":
        return mean, var / (mean.square().mean() + eps)
    if normalize == "none":
        return mean, var
    raise ValueError(f"mask_normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def conflict_mask(grads: Tensor, tau: float, normalize: str = "relative", eps: float = EPS, *,
                  return_variance: bool = False) -> tuple[Tensor, ...]:
    """(ḡ, M) with M = exp(−τ·V̂) in (0, 1]: near 1 where the domains agree, small where they conflict.
    With `return_variance`, (ḡ, M, V̂): training logs V̂ beside the mask."""
    mean, vhat = normalized_variance(grads, normalize, eps)
    mask = torch.exp(-tau * vhat)
    return (mean, mask, vhat) if return_variance else (mean, mask)


class LowRank(NamedTuple):
    U: Tensor  # (out, r), orthonormal columns
    S: Tensor  # (r,), descending
    Vh: Tensor  # (r, in), orthonormal rows


def randomized_svd(g: Tensor, rank: int, oversample: int = 10, niter: int = 2,
                   generator: torch.Generator | None = None) -> LowRank:
    """Top-`rank` SVD of g by a randomized range finder (Halko et al. 2011), with a sign convention.

    Like `torch.svd_lowrank`, but seeded through `generator` (svd_lowrank draws from the global RNG).
    U·diag(S)·Vh is the orthogonal projection of g onto span(U), so ‖g − P‖² = ‖g‖² − ΣS².
    Signs: each singular pair is flipped so that the largest-magnitude entry of its left vector is
    positive, which makes the factors independent of the random draw (sklearn's svd_flip).
    """
    m, n = g.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, device=g.device, dtype=g.dtype)
    Q = torch.linalg.qr(g @ omega).Q
    for _ in range(niter):  # power iterations sharpen a slowly decaying spectrum
        Q = torch.linalg.qr(g.T @ Q).Q
        Q = torch.linalg.qr(g @ Q).Q
    # SVD of the small q × n sketch through its QR: the SVD of a q × q triangle is ~3x cheaper on CPU
    # than that of the wide sketch, and as exact (q ≤ n by construction).
    Q2, R = torch.linalg.qr((Q.T @ g).T)  # (n, q), (q, q)
    Ub, S, Wh = torch.linalg.svd(R.T)  # Qᵀg = Rᵀ·Q2ᵀ = Ub·diag(S)·(Q2·Whᵀ)ᵀ
    k = min(rank, S.numel())
    U, S, Vh = Q @ Ub[:, :k], S[:k], (Q2 @ Wh[:k].T).T
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(k, device=g.device)])
    signs[signs == 0] = 1
    return LowRank(U * signs, S, Vh * signs[:, None])


def lora_factor_grads(g: Tensor, low: LowRank | None, A: Tensor, B: Tensor, scaling: float,
                      mode: str) -> tuple[Tensor, Tensor]:
    """(grad_A, grad_B) from the combined gradient g and, unless mode is none, its rank-r SVD."""
    if mode == "none":
        return scaling * (B.T @ g), scaling * (g @ A.T)
    if low is None:
        raise ValueError(f"projection {mode!r} needs the low-rank SVD of g")
    if mode == "chain_rule":  # P = U·diag(S)·Vh, applied without forming P
        SVh = low.S[:, None] * low.Vh
        return scaling * ((B.T @ low.U) @ SVh), scaling * (low.U @ (SVh @ A.T))
    if mode == "svd_factors":
        root = low.S.sqrt()
        grad_B, grad_A = low.U * root, root[:, None] * low.Vh
        r = A.shape[0]
        if grad_A.shape[0] < r:  # g had rank < r: the missing directions get zero gradient
            grad_A = torch.cat([grad_A, grad_A.new_zeros(r - grad_A.shape[0], grad_A.shape[1])])
            grad_B = torch.cat([grad_B, grad_B.new_zeros(grad_B.shape[0], r - grad_B.shape[1])], dim=1)
        return grad_A, grad_B
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {mode!r}")


def project_to_lora(g: Tensor, A: Tensor, B: Tensor, scaling: float, rank: int, mode: str,
                    generator: torch.Generator | None = None, oversample: int = 10, *,
                    return_residual: bool = False) -> tuple[Tensor, ...]:
    """LoRA factor gradients (grad_A (r, in), grad_B (out, r)) for the full-weight direction g (out, in).
    With `return_residual`, also ‖g − P‖ / ‖g‖ of the rank-r projection P (None when mode is none)."""
    low = None if mode == "none" else randomized_svd(g, rank, oversample, generator=generator)
    grads = lora_factor_grads(g, low, A, B, scaling, mode)
    if not return_residual:
        return grads
    return (*grads, None if low is None else projection_residual(g, low))


def projection_residual(g: Tensor, low: LowRank) -> float:
    """‖g − P‖ / ‖g‖ for the rank-r projection P (Pythagoras: P is an orthogonal projection of g)."""
    total = g.square().sum()
    if total == 0:
        return 0.0
    return float((1 - low.S.square().sum() / total).clamp(min=0).sqrt())
