"""Held-out metrics: avg@k, pass@k and per-domain accuracy against hand-computed values."""

import pytest

from megatron_opd.rewards.evaluation import metrics_at_k


def test_avg_and_pass_at_k_by_hand():
    m = metrics_at_k([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], [[3, 5], [4, 4], [2, 6]])
    assert m["eval/accuracy"] == pytest.approx(0.5) and m["eval/pass@2"] == pytest.approx(2 / 3)
    assert m["eval/response_length"] == pytest.approx(4.0) and m["eval/response_length_max"] == 6.0
    assert not any(k.startswith("eval/accuracy/") for k in m)


def test_per_domain_accuracy_by_hand():
    scores = [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]]
    m = metrics_at_k(scores, domains=["math", "code", "math", "code"])
    assert m["eval/accuracy/math"] == pytest.approx(0.75) and m["eval/accuracy/code"] == pytest.approx(0.25)
    assert m["eval/accuracy"] == pytest.approx(0.5)
    # one domain: nothing to split
    assert "eval/accuracy/math" not in metrics_at_k(scores, domains=["math"] * 4)
    with pytest.raises(ValueError, match="3 domain tags for 4 prompts"):
        metrics_at_k(scores, domains=["math"] * 3)
