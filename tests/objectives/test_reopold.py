"""REOPOLD: reward floor, entropy top-beta selection, phase schedule, metrics."""

import math

import pytest
import torch

from megatron_opd.objectives import clipped_reward, phase, reopold_loss, reward_floor, top_fraction_mask


def test_reward_floor_is_log_mixture_odds():
    assert reward_floor(0.2) == pytest.approx(math.log(0.25))  # -1.386
    s = torch.zeros(1, 4)
    t = torch.tensor([[-5.0, -1.0, 0.0, 2.0]])
    r, clipped = clipped_reward(s, t, 0.2)
    torch.testing.assert_close(r, torch.tensor([[math.log(0.25), -1.0, 0.0, 2.0]]))
    assert clipped.tolist() == [[True, False, False, False]]
    r2, c2 = clipped_reward(s, t, None)
    torch.testing.assert_close(r2, t)
    assert not c2.any()


@pytest.mark.parametrize("beta", [0.2, 0.5, 1.0])
def test_entropy_mask_keeps_stated_fraction(beta):
    torch.manual_seed(0)
    ent = torch.rand(4, 10)
    mask = torch.ones(4, 10)
    mask[1, 6:] = 0
    keep = top_fraction_mask(ent, mask, beta)
    n = int(mask.sum())
    assert int(keep.sum()) == math.ceil(beta * n)
    assert not (keep & ~mask.bool()).any()
    # the kept tokens are the highest-entropy ones
    assert ent[keep].min() >= ent[mask.bool() & ~keep].max() if beta < 1 else True


def test_phase_switches_at_switch_step():
    assert phase(0, 5) == "exploration" and phase(4, 5) == "exploration"
    assert phase(5, 5) == "refinement" and phase(100, None) == "refinement"


def test_reopold_loss_reports_fractions_and_selects_tokens():
    torch.manual_seed(0)
    lp = (torch.randn(3, 6) - 1).requires_grad_()
    t = torch.randn(3, 6) - 3
    ent = torch.rand(3, 6)
    mask = torch.ones(3, 6)
    loss, m = reopold_loss(lp, t, mask, step=10, entropy=ent, reward_clip_mixture=0.2,
                           entropy_top_beta=0.5, switch_step=5)
    assert m["reopold/phase"] == 1.0 and m["reopold/fraction_kept"] == 0.5
    assert 0 < m["reopold/fraction_clipped"] < 1
    (g,) = torch.autograd.grad(loss, lp)
    keep = top_fraction_mask(ent, mask, 0.5)
    assert (g[~keep] == 0).all() and (g[keep] != 0).any()
    _, m2 = reopold_loss(lp, t, mask, step=1, entropy=ent, switch_step=5)
    assert m2["reopold/phase"] == 0.0


def test_bad_beta_and_missing_entropy():
    with pytest.raises(ValueError, match="beta must be in"):
        top_fraction_mask(torch.rand(2, 2), torch.ones(2, 2), 1.5)
    with pytest.raises(ValueError, match="entropy is required"):
        reopold_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), entropy=None, entropy_top_beta=0.5)
