"""REOPOLD: reward floor, entropy top-beta selection, phase schedule, metrics."""

import math
from pathlib import Path

import pytest
import torch

from megatron_opd.objectives import (clipped_reward, phase, reopold_loss, reward_floor, select_tokens,
                                    top_fraction_mask)
from mopd_testing import last_json, run_ranks


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
    # the kept tokens are exactly the ceil(beta * n) highest entropies of the valid ones (sorted by hand)
    valid = sorted(((float(ent[i, j]), (i, j)) for i in range(4) for j in range(10) if mask[i, j]), reverse=True)
    expected = {pos for _, pos in valid[:math.ceil(beta * n)]}
    assert {(i, j) for i, j in keep.nonzero().tolist()} == expected


def test_tied_scores_are_kept_alike_in_one_process_and_over_two_replicas():
    """70 % of the entropies tied at the lowest value, beta = 0.8: the 80th-largest score is the tied one,
    so every tied token is kept (100), in one process and over two data-parallel replicas alike; breaking
    ties by position kept 80 in one process and 100 over two replicas."""
    score = torch.tensor([[0.9, 0.8, 0.7] + [0.5] * 7] * 10)
    assert int(top_fraction_mask(score, torch.ones(10, 10), 0.8).sum()) == 100
    top = top_fraction_mask(score, torch.ones(10, 10), 0.2)  # the 20th largest is 0.8: no tie at the cut
    assert int(top.sum()) == 20 and top[:, :2].all() and not top[:, 2:].any()
    r = last_json(run_ranks(Path(__file__).parent / "workers" / "reopold_ties.py", 2), "ties")
    assert r["ties"] == {"same": True, "kept": 100}


def test_phase_switches_at_switch_step():
    assert phase(0, 5) == "exploration" and phase(4, 5) == "exploration"
    assert phase(5, 5) == "refinement" and phase(100, None) == "refinement"


def test_floor_forms_of_the_two_secondary_sources():
    assert reward_floor(0.2, "log_odds") == pytest.approx(-1.3862944)  # log(0.2 / 0.8)
    assert reward_floor(0.2, "log_m_scaled") == pytest.approx(math.log(0.2) / 0.8)  # -2.0118
    r, clipped = clipped_reward(torch.zeros(1, 3), torch.tensor([[-3.0, -1.9, 0.0]]), 0.2, "log_m_scaled")
    torch.testing.assert_close(r, torch.tensor([[math.log(0.2) / 0.8, -1.9, 0.0]]))
    assert clipped.tolist() == [[True, False, False]]


def test_exploration_rules_select_by_the_floor_or_by_abs_reward():
    raw = torch.tensor([[-3.0, -1.0, 0.5, 2.0, -0.2, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    floor = -1.386
    below = select_tokens(raw, None, mask, "exploration", floor=floor, exploration="mask_below_floor")
    assert below.tolist() == [[False, True, True, True, True, False]]
    assert select_tokens(raw, None, mask, "exploration", floor=floor, exploration="clamp").tolist() == \
        [[True, True, True, True, True, False]]
    # |max(r, floor)| = [1.386, 1, 0.5, 2, 0.2]: the top 40 % (2 of 5) are 2.0 and the clamped -3
    top = select_tokens(raw, None, mask, "exploration", floor=floor, exploration="top_abs_reward",
                        exploration_beta=0.4)
    assert top.tolist() == [[True, False, False, True, False, False]]
    with pytest.raises(ValueError, match="needs a reward floor"):
        select_tokens(raw, None, mask, "exploration", floor=None, exploration="mask_below_floor")


def test_refinement_keeps_top_beta_by_entropy_or_everything():
    torch.manual_seed(0)
    ent, mask = torch.rand(3, 6), torch.ones(3, 6)
    keep = select_tokens(torch.zeros(3, 6), ent, mask, "refinement", refinement_beta=0.5)
    median = ent.flatten().sort().values[8]  # 18 tokens: the top 9 are those above the 9th smallest
    torch.testing.assert_close(keep, ent > median)
    assert select_tokens(torch.zeros(3, 6), None, mask, "refinement", refinement_beta=None).all()


def test_reopold_loss_trains_only_selected_tokens_and_reports_fractions():
    torch.manual_seed(0)
    lp = (torch.randn(3, 6) - 1).requires_grad_()
    t = torch.randn(3, 6) - 3
    mask = torch.ones(3, 6)
    keep = torch.zeros(3, 6, dtype=torch.bool)
    keep[:, ::2] = True  # any selection: half the tokens
    loss, m = reopold_loss(lp, t, mask, keep, reward_clip_mixture=0.2)
    raw = t - lp.detach()
    floor = math.log(0.2 / 0.8)
    assert float(m["reopold/fraction_kept"]) == 0.5
    assert float(m["reopold/fraction_clipped"]) == pytest.approx(float((raw < floor).float().mean()))
    assert 0 < float(m["reopold/fraction_clipped"]) < 1
    (g,) = torch.autograd.grad(loss, lp)
    assert (g[~keep] == 0).all() and (g[keep] != 0).any()
    # at rho = 1 the gradient is -max(r, floor) / N on kept tokens (policy gradient of the reward),
    # with r = lp_t - lp_s and the floor log(m / (1 - m)) written out here
    torch.testing.assert_close(g[keep], -raw.clamp(min=floor)[keep] / mask.sum())


def test_bad_beta_and_missing_entropy():
    with pytest.raises(ValueError, match="beta must be in"):
        top_fraction_mask(torch.rand(2, 2), torch.ones(2, 2), 1.5)
    with pytest.raises(ValueError, match="entropy is required"):
        select_tokens(torch.zeros(2, 2), None, torch.ones(2, 2), "refinement", refinement_beta=0.5)
