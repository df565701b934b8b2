"""Held-out evaluation: avg@k accuracy (mean reward over k samples per prompt), pass@k, lengths."""

from __future__ import annotations

from typing import Callable, Sequence


def avg_at_k(
    responses: Sequence[Sequence[str]],
    answers: Sequence[str],
    scorer: Callable[[str, str], float],
    lengths: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Args:
        responses: k responses per prompt.
        answers: gold answer per prompt.
        scorer: (response, answer) -> reward in [0, 1].
        lengths: response lengths in tokens (k per prompt), for the length metrics.
    """
    if len(responses) != len(answers):
        raise ValueError("responses and answers must have one entry per prompt")
    if not responses:
        raise ValueError("no prompts to evaluate")
    scores = [[scorer(r, a) for r in rs] for rs, a in zip(responses, answers)]
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
