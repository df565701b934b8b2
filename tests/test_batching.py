"""Cutting a replica's sequences into mini- and micro-batches (megatron_opd.batching)."""

import random

import pytest

from megatron_opd.batching import padded_tokens, plan_micro_batches


def test_fixed_rows_keep_rollout_order_and_group_into_mini_batches():
    plan = plan_micro_batches([5] * 8, mini_batches=2, max_rows=2)
    assert plan == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_budget_cuts_sorted_rows_within_each_mini_batch():
    lengths = [10, 40, 20, 30, 5, 5, 50, 12]
    plan = plan_micro_batches(lengths, mini_batches=2, max_rows=8, max_tokens=60)
    # mini-batch 0 = rows 0-3 longest first: 40 | 30, 20 (2 x 30 = 60) | 10 (3 x 30 > 60);
    # mini-batch 1 = rows 4-7: 50 | 12, 5, 5
    assert plan == [[[1], [3, 2], [0]], [[6], [7, 4, 5]]]


def test_budget_plan_is_a_partition_within_budget_and_row_cap():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 64) for _ in range(rng.choice([4, 8, 12]))]
        mini, rows, budget = rng.choice([1, 2, 4]), rng.randint(1, 6), rng.randint(64, 256)
        plan = plan_micro_batches(lengths, mini, rows, budget)
        per = len(lengths) // mini
        for m, micro in enumerate(plan):
            assert sorted(r for mb in micro for r in mb) == list(range(m * per, (m + 1) * per))
            for mb in micro:
                assert 1 <= len(mb) <= rows and len(mb) * max(lengths[r] for r in mb) <= budget


def test_budget_pads_less_than_fixed_rows_on_long_tailed_lengths():
    rng = random.Random(1)
    lengths = [min(4096, int(rng.paretovariate(1.2) * 200)) for _ in range(64)]
    fixed = padded_tokens(lengths, plan_micro_batches(lengths, 1, 8))
    budget = padded_tokens(lengths, plan_micro_batches(lengths, 1, 64, max_tokens=8192))
    assert budget < 0.6 * fixed, (budget, fixed, sum(lengths))


def test_unsplittable_requests_are_refused():
    with pytest.raises(ValueError, match="do not split into 2 mini-batches"):
        plan_micro_batches([3] * 5, 2, 2, max_tokens=10)
    with pytest.raises(ValueError, match="exceeds the micro-batch token budget"):
        plan_micro_batches([3, 30], 1, 2, max_tokens=10)
