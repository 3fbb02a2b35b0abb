"""Property tests of the baselines' gradient-combination rules and penalties (iga/combine.py)."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iga.combine import (
    and_mask,
    irm_penalty,
    mgda,
    min_norm_weights,
    pcgrad,
    pcgrad_projections,
    sand_mask,
    vrex_penalty,
)

FLOATS = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)


def gradients(n: int, p: int):
    return st.lists(FLOATS, min_size=n * p, max_size=n * p).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64).view(n, p))


@settings(max_examples=200, deadline=None)
@given(gradients(2, 5), st.integers(0, 2**31 - 1))
def test_pcgrad_leaves_no_conflict_with_the_other_domain(grads, seed):
    proj = pcgrad_projections(grads, torch.Generator().manual_seed(seed))
    scale = 1e-9 * (1 + grads.norm(dim=1).prod())
    assert proj[0] @ grads[1] >= -scale and proj[1] @ grads[0] >= -scale
    update = pcgrad(grads, torch.Generator().manual_seed(seed))
    assert torch.allclose(update, proj.sum(dim=0))
    assert all(update @ g >= -scale for g in grads)  # with two domains the sum conflicts with neither


def test_pcgrad_changes_nothing_without_conflict():
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0], [1.0, 1.0, 1.0]])
    assert torch.equal(pcgrad_projections(grads), grads)


@settings(max_examples=200, deadline=None)
@given(gradients(2, 4))
def test_mgda_two_gradients_closed_form(grads):
    g1, g2 = grads
    diff = g1 - g2
    if diff @ diff < 1e-9:
        return
    gamma = ((g2 - g1) @ g2 / (diff @ diff)).clamp(0, 1)
    assert torch.allclose(mgda(grads), gamma * g1 + (1 - gamma) * g2, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(gradients(3, 4))
def test_mgda_is_the_min_norm_point_of_the_hull(grads):
    """No point of a fine grid over the simplex is shorter than MGDA's (Frank-Wolfe) point."""
    weights = min_norm_weights(grads @ grads.T)
    assert torch.all(weights >= -1e-12) and abs(float(weights.sum()) - 1) < 1e-9
    best = float(mgda(grads).norm())
    steps = 60
    grid = min(float(((i * grads[0] + j * grads[1] + (steps - i - j) * grads[2]) / steps).norm())
               for i, j in itertools.product(range(steps + 1), repeat=2) if i + j <= steps)
    assert best <= grid + 1e-6 * (1 + float(grads.abs().max()))


def test_sand_mask_becomes_the_and_mask_as_k_grows():
    """Hand-made: coordinates 0-1 agree in sign in every domain, 2-3 in three of four, 4 is split."""
    grads = torch.tensor([[1.0, -2.0, 1.0, -1.0, 1.0],
                          [1.5, -1.0, 2.0, -2.0, -1.0],
                          [0.5, -3.0, 1.0, -1.5, 1.0],
                          [2.0, -2.5, -1.0, 1.0, -1.0]])
    mean = grads.mean(dim=0)
    strict = and_mask(grads, tau=1.0)  # only unanimous coordinates
    assert torch.allclose(strict, torch.tensor([1, 1, 0, 0, 0.0]) * mean / 0.4)
    assert torch.allclose(and_mask(grads, tau=0.5), torch.tensor([1, 1, 1, 1, 0.0]) * mean / 0.8)
    assert torch.allclose(sand_mask(grads, tau=0.9, k=1e6), strict)
    assert torch.allclose(sand_mask(grads, tau=0.4, k=1e6), and_mask(grads, tau=0.4))
    soft = sand_mask(grads, tau=0.9, k=0.5)
    assert soft[4] == 0 and soft[2] == 0 and torch.all(soft[:2].sign() == mean[:2].sign())


def test_sand_mask_refuses_tau_one():
    with pytest.raises(ValueError, match="tau must be in"):
        sand_mask(torch.ones(2, 3), tau=1.0, k=10)


@settings(max_examples=100, deadline=None)
@given(st.floats(-5, 5, allow_nan=False), st.integers(1, 6))
def test_vrex_penalty_is_zero_for_equal_domains(loss, n):
    assert float(vrex_penalty(torch.full((n,), loss, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-24)
    assert float(vrex_penalty(torch.tensor([0.0, 2.0]))) == pytest.approx(1.0)


def test_irm_penalty_is_zero_where_the_dummy_scale_is_optimal_and_else_the_gradient_product():
    scale = torch.ones(2, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[2.0, 3.0], [-1.0, 0.5]], dtype=torch.float64)  # domain x (even, odd)
    # Squared error of scale * target against target: optimal at scale = 1 in every domain.
    fit = irm_penalty((scale * targets[:, 0] - targets[:, 0]) ** 2, (scale * targets[:, 1] - targets[:, 1]) ** 2, scale)
    assert float(fit.detach()) == 0.0
    # Against 1 instead: d/ds (s t - 1)^2 at s = 1 is 2 t (t - 1); domains (2, 3) and (-1, 0.5).
    miss = irm_penalty((scale * targets[:, 0] - 1) ** 2, (scale * targets[:, 1] - 1) ** 2, scale)
    expected = ((2 * 2 * 1) * (2 * 3 * 2) + (2 * -1 * -2) * (2 * 0.5 * -0.5)) / 2
    assert float(miss.detach()) == pytest.approx(expected)
    miss.backward()  # differentiable for the outer step
    assert scale.grad is not None
