"""Aggregation with global counts, clipped surrogate, dual clip, KL estimators."""

from pathlib import Path

import pytest
import torch

from megatron_opd.objectives import AGG_MODES, aggregate_loss, clipped_surrogate, global_counts, kl_estimate
from mopd_testing import run_ranks


def _batch():
    torch.manual_seed(0)
    loss = torch.rand(6, 9)
    mask = torch.zeros(6, 9)
    for i, n in enumerate([9, 3, 5, 1, 7, 2]):
        mask[i, :n] = 1
    return loss, mask


def test_token_mean_normalises_by_all_tokens():
    loss, mask = _batch()
    expected = (loss * mask).sum() / mask.sum()
    torch.testing.assert_close(aggregate_loss(loss, mask, "token-mean"), expected)


def test_seq_modes_documented_normalisations():
    loss, mask = _batch()
    per_seq_sum = (loss * mask).sum(-1)
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq-mean-token-sum"), per_seq_sum.mean())
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq-mean-token-mean"),
                               (per_seq_sum / mask.sum(-1)).mean())


@pytest.mark.parametrize("mode", AGG_MODES)
def test_unequal_micro_batches_sum_to_full_batch(mode):
    loss, mask = _batch()
    full = aggregate_loss(loss, mask, mode)
    # two micro-batches of different sizes and padded lengths
    parts = [(loss[:2, :9], mask[:2, :9]), (loss[2:, :7], mask[2:, :7])]
    n_tok, n_seq = global_counts([m for _, m in parts])
    summed = sum(aggregate_loss(l, m, mode, n_tok, n_seq) for l, m in parts)
    torch.testing.assert_close(summed, full)
    # without global counts the naive per-micro-batch mean would differ (the test can fail)
    naive = sum(aggregate_loss(l, m, mode) for l, m in parts) / 2
    assert not torch.allclose(naive, full)


def test_data_parallel_global_counts_two_ranks():
    run_ranks(Path(__file__).parent / "workers" / "dp_counts.py", 2)


def test_clipped_surrogate_clip_fraction_and_values():
    lp_old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    adv = torch.ones(1, 4)
    loss, m = clipped_surrogate(lp, lp_old, adv, torch.ones(1, 4), eps_low=0.2, eps_high=0.28)
    # A > 0: loss = -min(rho, clip(rho)) -> ratio 1.5 clipped to 1.28; ratio 0.5 keeps 0.5 (min)
    torch.testing.assert_close(loss, -torch.tensor([[0.5, 0.9, 1.1, 1.28]]))
    assert m["clip_fraction"] == 0.25


def test_dual_clip_caps_negative_advantage_loss():
    lp_old = torch.zeros(1, 2)
    lp = torch.log(torch.tensor([[10.0, 1.0]]))
    adv = -torch.ones(1, 2)
    loss, m = clipped_surrogate(lp, lp_old, adv, torch.ones(1, 2), dual_clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 1.0]]))  # 10 capped at c = 3
    assert m["dual_clip_fraction"] == 0.5


def test_kl_estimators_closed_forms():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    log_r = ref - lp
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), -log_r)
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), 0.5 * log_r**2)
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), log_r.exp() - 1 - log_r)
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(lp, ref, "k4")


def test_unknown_mode_and_bad_mask():
    loss, mask = _batch()
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(loss, mask, "sum")
    with pytest.raises(ValueError, match="mask has shape"):
        aggregate_loss(loss, mask[:, :3], "token-mean")


def test_prefix_is_weights_by_hand_and_the_exact_kl_uses_them():
    """The exact KL at position t does not depend on the token sampled at t: the engine's samples before
    t are what reached it, so its correction is the prefix's ratio, truncated; the token's own ratio (what
    the sampled estimator uses) only added variance."""
    import math

    import torch

    from megatron_opd.batching import MicroBatch
    from megatron_opd.config import GOPDConfig
    from megatron_opd.loss import GOPDObjective, StudentOutputs
    from megatron_opd.objectives.policy_loss import prefix_is_weights

    old = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0]])
    rollout = torch.tensor([[0.0, -1.5, -1.0, -1.5, 0.0]])  # log-ratios 0.5, -1.0, 1.0 on the response
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    w = prefix_is_weights(old, rollout, mask, cap=1.5)
    # before position 1: nothing (1); before 2: e^0.5 = 1.65, capped at 1.5; before 3: e^(0.5 - 1.0);
    # before 4: e^(0.5 - 1.0 + 1.0), capped
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.5, math.exp(-0.5), 1.5]]))

    kl = torch.tensor([[0.0, 0.3, 0.2, 0.1, 0.0]])
    mb = MicroBatch(input_ids=torch.zeros(1, 6, dtype=torch.long), mask=mask, rollout_logprobs=rollout,
                    teacher_index=torch.zeros(1), outcome_rewards=torch.zeros(1), group=torch.zeros(1),
                    old_logprobs=old, global_tokens=3.0, global_seqs=1.0)
    out = StudentOutputs(logprobs=old.clone(), kl=kl, teacher_logprobs=old)
    objective = GOPDObjective(GOPDConfig(estimator="full", tis_cap=1.5))
    loss, metrics = objective._exact_kl_loss(mb, out)
    expected = (0.3 * 1.0 + 0.2 * 1.5 + 0.1 * math.exp(-0.5)) / 3  # the token's own ratios would give 1.5, e^-1, 1.5
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_masked_importance_sampling_drops_tokens_outside_the_bounds_and_weights_the_rest_by_their_ratio():
    """IcePop-style masked IS (objective.*.is_mask): hand-computed weights for ratios inside, below and above
    [low, high], alone and with tis_cap; the masked fraction and the ratio metrics; and through the GRPO
    policy loss (advantage 1, pi = pi_old: the loss is -sum(w) / tokens)."""
    import math

    import torch

    from megatron_opd.config import GRPOConfig
    from megatron_opd.objectives import grpo_loss
    from megatron_opd.objectives.policy_loss import off_policy_weights

    log_ratios = [0.0, math.log(0.4), math.log(3.0), math.log(6.0), 0.0]  # the last is off the response
    old = torch.tensor([[-1.0 + r for r in log_ratios]])
    rollout = torch.full((1, 5), -1.0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    w, metrics = off_policy_weights(old, rollout, mask, tis_cap=None, is_mask=(0.5, 5.0))
    torch.testing.assert_close(w[0, :4], torch.tensor([1.0, 0.0, 3.0, 0.0]))  # 0.4 < 0.5 and 6 > 5 dropped
    assert float(metrics["offpolicy/masked_fraction"]) == pytest.approx(0.5)
    assert float(metrics["offpolicy/ratio_mean"]) == pytest.approx((1 + 0.4 + 3 + 6) / 4)
    assert float(metrics["offpolicy/ratio_max"]) == pytest.approx(6.0)
    w, _ = off_policy_weights(old, rollout, mask, tis_cap=2.0, is_mask=(0.5, 5.0))
    torch.testing.assert_close(w[0, :4], torch.tensor([1.0, 0.0, 2.0, 0.0]))  # inside: min(ratio, cap)
    assert off_policy_weights(old, rollout, mask, tis_cap=None, is_mask=None) == (None, {})

    cfg = GRPOConfig(tis_cap=None, is_mask=[0.5, 5.0])
    loss, metrics = grpo_loss(old.clone().requires_grad_(), torch.ones(1), mask, cfg, old_logprobs=old,
                              rollout_logprobs=rollout, num_tokens=4.0, num_seqs=1.0)
    assert loss.item() == pytest.approx(-(1.0 + 0.0 + 3.0 + 0.0) / 4, rel=1e-6)


@pytest.mark.parametrize("bounds", [[0.5], [1.2, 5.0], [0.5, 0.9], [-0.1, 2.0]])
def test_is_mask_bounds_are_checked(bounds):
    from megatron_opd.config import GOPDConfig

    with pytest.raises(ValueError, match=r"objective.gopd.is_mask"):
        GOPDConfig(is_mask=bounds)
