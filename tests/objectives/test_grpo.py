"""GRPO baseline: group-normalised advantages and the clipped policy loss against closed forms."""

import pytest
import torch

from megatron_opd.config import LossTermsConfig
from megatron_opd.objectives import group_advantages, grpo_loss


def test_group_advantages_equal_the_closed_form_in_any_row_order():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    adv = group_advantages(rewards, groups)
    # group 0: mean 0.5, std 0.5 -> +-1; groups 1 and 2 are constant -> 0 (no signal)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # token budgets reorder rows: ids, not positions
    torch.testing.assert_close(group_advantages(rewards[perm], groups[perm]), adv[perm])
    centred = group_advantages(rewards, groups, normalize_std=False)  # Dr. GRPO
    torch.testing.assert_close(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_grpo_gradient_at_ratio_one_is_the_advantage_weighted_score():
    torch.manual_seed(0)
    lp = (torch.randn(3, 5) - 1).requires_grad_()
    mask = torch.tensor([[1.0] * 5, [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    adv = torch.tensor([1.5, -0.5, 0.0])
    loss, metrics = grpo_loss(lp, adv, mask, num_tokens=float(mask.sum()))
    (g,) = torch.autograd.grad(loss, lp)
    # d/d lp of -(1/N) sum_t A_i rho_it at rho = 1 is -A_i / N on response tokens, 0 elsewhere
    torch.testing.assert_close(g, -adv.view(-1, 1) * mask / mask.sum())
    assert metrics["clip_fraction"] == 0.0


def test_grpo_kl_term_pulls_towards_the_reference_and_bad_shapes_are_named():
    lp = torch.zeros(2, 3, requires_grad=True)
    ref = torch.full((2, 3), -1.0)
    mask = torch.ones(2, 3)
    loss, m = grpo_loss(lp, torch.zeros(2), mask, LossTermsConfig(kl_coef=0.5), ref_logprobs=ref)
    (g,) = torch.autograd.grad(loss, lp)
    # k3 = exp(r) - 1 - r with r = ref - lp: d/d lp = 1 - exp(ref - lp) > 0 here (lp above ref)
    torch.testing.assert_close(g, 0.5 * (1 - torch.exp(ref - lp.detach())) / 6)
    assert m["kl/student_reference"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(lp, torch.zeros(3), mask)
