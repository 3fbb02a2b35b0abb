"""Property tests for the IGA math in iga/core.py (plain tensors, no model)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iga.core import (
    conflict_mask,
    lora_factor_grads,
    normalized_variance,
    project_to_lora,
    projection_residual,
    randomized_svd,
    reconstruct,
)

settings.register_profile("iga", deadline=None, max_examples=60)
settings.load_profile("iga")


@st.composite
def domain_grads(draw):
    n, out, inn = draw(st.integers(2, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed, scale = draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([1e-5, 1e-2, 1.0, 1e3]))
    return scale * torch.randn(n, out, inn, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def spectrum_matrix(out: int, inn: int, decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with singular values decay**i, and those values."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=torch.float64)).Q
    k = min(out, inn)
    s = decay ** torch.arange(k, dtype=torch.float64)
    return U[:, :k] @ torch.diag(s) @ V[:, :k].T, s


@given(domain_grads(), st.floats(0, 5), st.sampled_from(["none", "relative"]))
def test_mask_is_in_0_1_and_positive_where_representable(grads, tau, normalize):
    _, mask = conflict_mask(grads, tau, normalize)
    _, vhat = normalized_variance(grads, normalize)
    assert mask.shape == grads.shape[1:]
    assert bool(((mask >= 0) & (mask <= 1)).all())
    representable = tau * vhat < 700  # exp(-x) underflows float64 beyond that
    assert bool((mask[representable] > 0).all())


@given(domain_grads(), st.sampled_from(["none", "relative"]))
def test_tau_zero_gives_the_plain_mean(grads, normalize):
    mean, mask = conflict_mask(grads, 0.0, normalize)
    torch.testing.assert_close(mean * mask, grads.mean(0))


@given(domain_grads(), st.floats(0, 5), st.integers(0, 1000))
def test_permuting_domains_changes_nothing(grads, tau, seed):
    perm = torch.randperm(grads.shape[0], generator=torch.Generator().manual_seed(seed))
    for normalize in ("none", "relative"):
        m1, k1 = conflict_mask(grads, tau, normalize)
        m2, k2 = conflict_mask(grads[perm], tau, normalize)
        torch.testing.assert_close(m1, m2)
        torch.testing.assert_close(k1, k2)


@given(domain_grads(), st.floats(0, 5))
def test_identical_domains_give_mask_one(grads, tau):
    same = grads[:1].expand_as(grads).clone()
    for normalize in ("none", "relative"):
        mean, mask = conflict_mask(same, tau, normalize)
        assert bool((mask == 1).all())
        torch.testing.assert_close(mean, grads[0])


def test_relative_mask_discriminates_where_raw_is_inert():
    """The paper's defect 2: on gradient-sized numbers exp(-τV) is 1 everywhere."""
    g = torch.Generator().manual_seed(0)
    agree = torch.full((4, 8, 8), 1e-4, dtype=torch.float64) + 1e-6 * torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    conflict = 1e-4 * torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    grads = torch.cat([agree, conflict], dim=1)  # top half agrees, bottom half conflicts
    _, raw = conflict_mask(grads, 0.5, "none")
    assert raw.min() > 1 - 1e-6
    _, rel = conflict_mask(grads, 0.5, "relative")
    assert rel[:8].mean() > 0.99 and rel[8:].mean() < rel[:8].mean() - 0.2


def test_reconstruct_factor_is_the_first_order_change_of_delta_w():
    g = torch.Generator().manual_seed(1)
    out, inn, r, s = 7, 5, 2, 2.0
    G = torch.randn(out, inn, generator=g, dtype=torch.float64)
    A = torch.randn(r, inn, generator=g, dtype=torch.float64)
    B = torch.randn(out, r, generator=g, dtype=torch.float64)
    assert reconstruct(G, A, B, s, "exact") is G
    grad_A, grad_B = s * B.T @ G, s * G @ A.T
    torch.testing.assert_close(reconstruct(G, A, B, s, "factor"), s * (grad_B @ A + B @ grad_A))
    # batched over domains, and at PEFT's init (B = 0) it is s²·G·AᵀA
    stacked = reconstruct(torch.stack([G, 2 * G]), A, torch.zeros_like(B), s, "factor")
    torch.testing.assert_close(stacked[1], 2 * s * s * G @ A.T @ A)
    with pytest.raises(ValueError, match="reconstruction"):
        reconstruct(G, A, B, s, "full")


# rtol: the randomized range finder is exact when rank + oversample covers the smaller side (12 × 50),
# and close to exact otherwise (2 power iterations; slower decay is harder).
@pytest.mark.parametrize("out, inn, rank, decay, rtol", [(40, 30, 4, 0.7, 1e-6), (64, 64, 16, 0.9, 1e-5),
                                                         (12, 50, 3, 0.5, 1e-9)])
def test_projection_error_is_the_tail_of_the_spectrum(out, inn, rank, decay, rtol):
    """Eckart–Young: the best rank-r approximation misses exactly sqrt(Σ_{i>r} σ_i²)."""
    g, s = spectrum_matrix(out, inn, decay, seed=out)
    low = randomized_svd(g, rank, generator=torch.Generator().manual_seed(0))
    P = low.U @ torch.diag(low.S) @ low.Vh
    tail = s[rank:].square().sum().sqrt()
    torch.testing.assert_close(torch.linalg.norm(g - P), tail, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(low.S, s[:rank], rtol=rtol, atol=1e-12)
    assert math.isclose(projection_residual(g, low), float(tail / torch.linalg.norm(g)), rel_tol=1e-5, abs_tol=1e-7)


def _factor_setup(seed: int, out: int = 30, inn: int = 20, r: int = 4):
    gen = torch.Generator().manual_seed(seed)
    g, _ = spectrum_matrix(out, inn, 0.8, seed)
    A = torch.randn(r, inn, generator=gen, dtype=torch.float64)
    B = torch.randn(out, r, generator=gen, dtype=torch.float64)
    return g, A, B


def first_order_delta_w(grad_A, grad_B, A, B, s):
    """The change of ΔW = s·B·A along the factor direction (grad_A, grad_B), to first order."""
    return s * (grad_B @ A + B @ grad_A)


@given(st.integers(0, 10_000), st.floats(0.1, 4), st.integers(1, 8))
def test_chain_rule_is_a_descent_direction(seed, s, r):
    g, A, B = _factor_setup(seed, r=r)
    for mode in ("chain_rule", "none"):
        grad_A, grad_B = project_to_lora(g, A, B, s, r, mode, torch.Generator().manual_seed(seed))
        assert grad_A.shape == A.shape and grad_B.shape == B.shape
        assert float((first_order_delta_w(grad_A, grad_B, A, B, s) * g).sum()) >= -1e-9


def test_svd_factors_is_not_a_descent_direction_in_general():
    """The paper's defect 3: ∇B = U√Σ, ∇A = √Σ·Vᵀ ignore the current factors."""
    g, _, _ = _factor_setup(0)
    low = randomized_svd(g, 4)
    A = -low.S.sqrt()[:, None] * low.Vh  # a legitimate current A; B = 0 as at PEFT's init
    B = torch.zeros(g.shape[0], 4, dtype=g.dtype)
    grad_A, grad_B = lora_factor_grads(g, low, A, B, 2.0, "svd_factors")
    assert float((first_order_delta_w(grad_A, grad_B, A, B, 2.0) * g).sum()) < 0


def test_svd_factors_are_sign_stable_across_random_draws():
    g, A, B = _factor_setup(3)
    results = [project_to_lora(g, A, B, 2.0, 4, "svd_factors", torch.Generator().manual_seed(seed))
               for seed in range(5)]
    for grad_A, grad_B in results[1:]:  # a sign flip would differ by twice an entry (~0.1 here)
        torch.testing.assert_close(grad_A, results[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_B, results[0][1], rtol=1e-4, atol=1e-5)
    # and the factors reproduce the rank-r projection
    grad_A, grad_B = results[0]
    low = randomized_svd(g, 4)
    torch.testing.assert_close(grad_B @ grad_A, low.U @ torch.diag(low.S) @ low.Vh, rtol=1e-4, atol=1e-5)


def test_svd_factors_pad_when_g_has_lower_rank_than_r():
    g = torch.outer(torch.arange(1.0, 6.0), torch.ones(3))  # rank 1, 5 × 3
    A, B = torch.zeros(4, 3), torch.zeros(5, 4)
    grad_A, grad_B = project_to_lora(g, A, B, 2.0, 4, "svd_factors")
    assert grad_A.shape == (4, 3) and grad_B.shape == (5, 4)
    torch.testing.assert_close(grad_B @ grad_A, g, rtol=1e-5, atol=1e-5)
