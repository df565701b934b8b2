"""ERPD: SAPO gate, CE/MSE hand values, group advantages, whitening, masking, stage-2 surrogate."""

import math

import pytest
import torch

from megatron_opd.objectives import (
    ERPDStage1Config,
    ERPDStage2Config,
    build_signal,
    ensemble_signals,
    group_normalized_advantages,
    keep_part,
    stage2_signals,
    sapo_gate,
    stage1_loss,
    trust_region_distill_loss,
    whiten,
)


@pytest.mark.parametrize("tau", [1.0, 1.05, 3.0])
def test_sapo_gate_has_unit_derivative_at_ratio_one(tau):
    rho = torch.tensor(1.0, requires_grad=True)
    (d,) = torch.autograd.grad(sapo_gate(rho, tau), rho)
    assert d.item() == pytest.approx(1.0, abs=1e-6)


def test_ce_implicit_prm_equals_hand_value():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    old = torch.tensor([[-1.5, -2.5, 0.0], [-0.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    R = torch.tensor([1.0, 0.0])
    cfg = ERPDStage1Config(loss="ce", beta=0.05, aggregation="sum")
    loss, _ = stage1_loss(cfg, lp, old, mask, R)
    r = [0.05 * (0.5 + 0.5), 0.05 * (0.5)]
    bce = [-math.log(1 / (1 + math.exp(-r[0]))), -math.log(1 - 1 / (1 + math.exp(-r[1])))]
    assert loss.item() == pytest.approx(sum(bce) / 2, rel=1e-6)


def test_mse_equals_hand_value_per_token_and_summed():
    lp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-2.0, -2.0]])
    mask = torch.ones(1, 2)
    R = torch.tensor([1.0])
    per_tok, _ = stage1_loss(ERPDStage1Config(loss="mse", beta=0.5, mse_target="reward"), lp, old, mask, R)
    # token implicit rewards 0.5*1, 0.5*0 -> squared errors 0.25, 1 -> token-mean 0.625
    assert per_tok.item() == pytest.approx(0.625)
    summed, _ = stage1_loss(ERPDStage1Config(loss="mse", beta=0.5, mse_per_token=False, mse_target="reward"),
                            lp, old, mask, R)
    assert summed.item() == pytest.approx((0.5 - 1.0) ** 2)


def test_mse_signed_target_gives_failed_samples_a_gradient_at_pi_old():
    """With R in {0, 1} a failed sample's target is 0 = its implicit reward at pi = pi_old: no gradient,
    though the paper's unlearning phase is driven by negative samples. The default target is 2R - 1."""
    old = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]])
    mask = torch.ones(2, 2)
    R = torch.tensor([1.0, 0.0])
    grads = {}
    for target in ("reward", "signed"):
        value, grads[target] = _stage1("mse", old, old, mask, R, beta=0.5, mse_target=target)
    assert (grads["reward"][1] == 0).all()  # the failed sample: nothing to learn from
    # signed: d/d lp of mean_t (0.5 (lp - old) - (2R - 1))^2 at lp = old is 2 * 0.5 * -(2R - 1) / N
    torch.testing.assert_close(grads["signed"], -(2 * R - 1).view(-1, 1).expand(2, 2) * 0.5 * 2 / 4)
    assert grads["signed"][1, 0] > 0  # loss rises with the failed sample's log-prob: it is pushed down
    assert ERPDStage1Config(loss="mse").setting("mse_target") == "signed"
    with pytest.raises(ValueError, match="mse_target='centred': use signed or reward"):
        ERPDStage1Config(loss="mse", mse_target="centred")
    with pytest.raises(ValueError, match="mse_target='signed' is not used by loss=ce"):
        ERPDStage1Config(loss="ce", mse_target="signed")


def test_group_normalized_advantages():
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), group_size=3)
    g = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(adv[:3], (g - g.mean()) / (g.std(unbiased=False) + 1e-6))
    torch.testing.assert_close(adv[3:], torch.zeros(3))


def test_whitening_zero_mean_unit_std_over_masked_tokens():
    torch.manual_seed(0)
    s = torch.randn(4, 7) * 3 + 5
    mask = (torch.rand(4, 7) > 0.3).float()
    w = whiten(s, mask)
    vals = w[mask.bool()]
    assert vals.mean().abs() < 1e-6 and (vals.std(unbiased=False) - 1).abs() < 1e-5
    assert (w[~mask.bool()] == 0).all()


def test_keep_positive_and_ensemble():
    s = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    pos = torch.tensor([True, False])
    torch.testing.assert_close(keep_part(s, pos, "positive"), torch.tensor([[1.0, 0.0], [2.0, -2.0]]))
    torch.testing.assert_close(keep_part(s, pos, "negative"), torch.tensor([[0.0, -1.0], [2.0, -2.0]]))
    mask = torch.ones(2, 2)
    torch.testing.assert_close(ensemble_signals([s, 2 * s], mask), 2 * whiten(s, mask))


def test_outlier_ablation_masks_the_raw_signal_then_whitens_what_is_kept():
    """The paper masks the raw S, then whitens what is kept ("whitening after masking"); masking by the sign
    of the whitened S kept a different set: every token with 0 < S < mean changed side."""
    torch.manual_seed(0)
    s = torch.randn(8, 10) + 0.6  # mostly positive: whitening moves 0 < S < mean below zero
    mask = torch.ones(8, 10)
    mask[7, 6:] = 0
    pos = torch.tensor([True] * 6 + [False] * 2)
    kept = ((s > 0) | ~pos.view(-1, 1)) & mask.bool()  # by hand: S > 0 on positive samples, all on negative
    out = stage2_signals([s[:4], s[4:]], [mask[:4], mask[4:]], [pos[:4], pos[4:]], "positive", True)
    out = torch.cat(out)
    assert torch.equal(out != 0, kept)
    vals = out[kept]
    assert vals.mean().abs() < 1e-6 and (vals.std(unbiased=False) - 1).abs() < 1e-5  # over the kept tokens
    old_order = keep_part(whiten(s, mask), pos, "positive")
    assert (old_order != 0).sum() < kept.sum()  # the old order dropped tokens the paper keeps
    # without whitening: the raw S on the kept tokens; with keep=None: the whole batch whitened
    torch.testing.assert_close(stage2_signals([s], [mask], [pos], "positive", False)[0], s * kept)
    torch.testing.assert_close(stage2_signals([s], [mask], [pos], None, True)[0], whiten(s, mask))


def test_stage2_surrogate_gradient_is_signal_at_ratio_one():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    num = torch.tensor([[-0.5, -2.5, -0.5]])
    sig = whiten(build_signal(num, lp.detach()), torch.ones(1, 3))
    loss, m = trust_region_distill_loss(ERPDStage2Config(kl_coef=0.1), lp, lp.detach(), sig, torch.ones(1, 3))
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, -sig / 3)  # k3 KL has zero gradient at pi = pi_old
    assert m["kl/student_old"] == pytest.approx(0.0)


def test_bad_configs():
    with pytest.raises(ValueError, match="erpd.stage1.loss"):
        ERPDStage1Config(loss="dpo")
    with pytest.raises(ValueError, match="erpd.stage2.strategy"):
        ERPDStage2Config(strategy=4)


def _stage1(loss, lp, old, mask, R, adv=None, **cfg):
    lp = lp.clone().requires_grad_()
    value, _ = stage1_loss(ERPDStage1Config(loss=loss, **cfg), lp, old, mask, R, advantages=adv,
                           num_tokens=float(mask.sum()), num_seqs=float(mask.shape[0]))
    (grad,) = torch.autograd.grad(value, lp)
    return value.item(), grad


def test_every_stage1_loss_value_and_gradient_equal_closed_forms():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]])
    delta = torch.tensor([[0.3, -0.2, 0.1], [-0.4, 0.2, 0.05]])  # lp - lp_old: ratios away from 1
    lp, mask = old + delta, torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    R, adv = torch.tensor([1.0, 0.0]), torch.tensor([0.8, -1.3])
    N, rho, A = mask.sum(), delta.exp(), adv.view(-1, 1).expand(2, 3)

    # GRPO: -min(rho A, clip(rho) A) per token, token-mean
    value, grad = _stage1("grpo", lp, old, mask, R, adv)
    clipped = rho.clamp(0.8, 1.28)
    per = torch.maximum(-rho * A, -clipped * A)
    assert value == pytest.approx(float((per * mask).sum() / N), rel=1e-6)
    active = (-rho * A >= -clipped * A).float()  # the unclipped branch carries the gradient
    torch.testing.assert_close(grad, -A * rho * active * mask / N)

    # SAPO: -f(rho) A with f = sigmoid(tau (rho - 1)) 4 / tau; tau_pos for A > 0, tau_neg for A < 0
    value, grad = _stage1("sapo", lp, old, mask, R, adv, tau_pos=1.0, tau_neg=3.0)
    tau = torch.where(A > 0, torch.tensor(1.0), torch.tensor(3.0))
    sig = torch.sigmoid(tau * (rho - 1))
    assert value == pytest.approx(float((-sig * 4 / tau * A * mask).sum() / N), rel=1e-6)
    torch.testing.assert_close(grad, -4 * sig * (1 - sig) * rho * A * mask / N)  # d f / d lp = f'(rho) rho

    # CE: BCE(sigmoid(beta sum_t log-ratio), R) per sequence, seq-mean; d/d lp_t = beta (sigmoid(r) - R)
    value, grad = _stage1("ce", lp, old, mask, R, beta=0.5, aggregation="sum")
    r = 0.5 * (delta * mask).sum(-1)
    bce = -(R * torch.log(torch.sigmoid(r)) + (1 - R) * torch.log(1 - torch.sigmoid(r)))
    assert value == pytest.approx(float(bce.mean()), rel=1e-6)
    torch.testing.assert_close(grad, 0.5 * (torch.sigmoid(r) - R).view(-1, 1) * mask / 2)
    assert grad[0, 0] < 0 < grad[1, 0]  # a correct sample's tokens are pushed up, a wrong one's down

    # MSE per token: (beta log-ratio - R)^2, token-mean; gradient 2 beta (beta log-ratio - R)
    value, grad = _stage1("mse", lp, old, mask, R, beta=0.5, mse_target="reward")
    err = 0.5 * delta - R.view(-1, 1)
    assert value == pytest.approx(float((err**2 * mask).sum() / N), rel=1e-6)
    torch.testing.assert_close(grad, 2 * 0.5 * err * mask / N)
