"""Held-out evaluation: avg@k accuracy (mean reward over k samples per prompt), pass@k, lengths."""

from __future__ import annotations

from typing import Sequence


def metrics_at_k(scores: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]] | None = None) -> dict:
    """avg@k / pass@k / length metrics.

    Args:
        scores: k rewards in [0, 1] per prompt (avg@k = mean over prompts of the mean over k).
        lengths: response lengths in tokens (k per prompt), for the length metrics.
    """
    if not scores:
        raise ValueError("no prompts to evaluate")
    k = len(scores[0])
    metrics = {
        "eval/accuracy": sum(sum(s) / len(s) for s in scores) / len(scores),
        f"eval/pass@{k}": sum(float(max(s) > 0) for s in scores) / len(scores),
        "eval/num_prompts": float(len(scores)),
    }
    if lengths is not None:
        flat = [l for ls in lengths for l in ls]
        metrics["eval/response_length"] = sum(flat) / max(len(flat), 1)
        metrics["eval/response_length_max"] = float(max(flat)) if flat else 0.0
    return metrics
