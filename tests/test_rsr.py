"""The Rank-Surprisal Ratio (iga/rsr.py) against a hand computation, and its properties."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iga.rsr import IGNORE, dataset_rsr, token_rank_nll, trajectory_rsr
from iga.train.sft import IGNORE as TRAINING_IGNORE


def test_ranks_and_nlls_by_hand_with_a_tie_clipping_and_padding():
    logits = torch.tensor([[[2.0, 1.0, 1.0, 0.0],    # target 1: only 2.0 is strictly greater (the tie with
                            [0.0, 3.0, 1.0, 2.0],    # index 2 does not count) -> rank 2; target 0: 3 above -> 4
                            [5.0, 5.0, 5.0, 5.0]]])  # padding
    targets = torch.tensor([[1, 0, IGNORE]])
    ranks, nlls = token_rank_nll(logits, targets)
    assert ranks.tolist() == [[2, 4, 0]]
    lse = [math.log(sum(math.exp(x) for x in row)) for row in ([2, 1, 1, 0], [0, 3, 1, 2])]
    assert nlls[0, :2].tolist() == pytest.approx([lse[0] - 1.0, lse[1] - 0.0], rel=1e-6)
    assert nlls[0, 2] == 0
    clipped, _ = token_rank_nll(logits, targets, clip=3)
    assert clipped.tolist() == [[2, 3, 0]]
    assert trajectory_rsr(ranks, nlls).item() == pytest.approx(6 / (lse[0] - 1.0 + lse[1]), rel=1e-6)


def test_dataset_rsr_is_a_ratio_of_means_over_trajectories_not_over_tokens():
    ranks = torch.tensor([[1, 3, 0, 0], [2, 2, 2, 2]])
    nlls = torch.tensor([[0.5, 1.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    scored = torch.tensor([[True, True, False, False], [True] * 4])
    # mean ranks 2 and 2, mean NLLs 1 and 1: 2 / 1 (token-weighted would also be 12 / 6 here), so skew it:
    assert dataset_rsr(ranks, nlls, scored) == pytest.approx(2.0)
    nlls[1] = 3.0  # mean NLLs 1 and 3 -> 2 / 2; token-weighted: (4 + 8) / (2 + 12) = 0.857
    assert dataset_rsr(ranks, nlls, scored) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no scored token"):
        dataset_rsr(ranks, nlls, torch.zeros_like(scored))


def test_shape_and_clip_errors_are_clear():
    with pytest.raises(ValueError, match="do not predict targets"):
        token_rank_nll(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="clip must be >= 1"):
        token_rank_nll(torch.zeros(1, 5), torch.zeros(1, dtype=torch.long), clip=0)


def test_the_ignored_label_is_the_training_one():
    assert IGNORE == TRAINING_IGNORE


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(2, 30), st.integers(1, 40))
def test_rank_bounds_and_nll_agree_with_cross_entropy(seed, t, v, clip):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, v, generator=g).round(decimals=1)  # rounding makes ties common
    targets = torch.randint(0, v, (t,), generator=g)
    ranks, nlls = token_rank_nll(logits, targets, clip=clip)
    assert bool(((ranks >= 1) & (ranks <= min(clip, v))).all())
    top = logits.gather(1, targets[:, None]).squeeze(1) == logits.max(dim=1).values
    assert torch.equal(ranks == 1, top | (clip == 1))  # rank 1 exactly when no logit is strictly greater
    torch.testing.assert_close(nlls, torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
