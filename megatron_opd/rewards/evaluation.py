"""Held-out evaluation: avg@k accuracy (mean reward over k samples per prompt), pass@k, lengths."""

from __future__ import annotations

from typing import Sequence

#: Key prefix of the per-domain accuracies (`eval/accuracy/<domain>`), read back by `megatron-opd study`.
DOMAIN_ACCURACY_PREFIX = "eval/accuracy/"


def metrics_at_k(scores: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]] | None = None,
                 domains: Sequence[str] | None = None) -> dict:
    """avg@k / pass@k / length metrics.

    Args:
        scores: k rewards in [0, 1] per prompt (avg@k = mean over prompts of the mean over k).
        lengths: response lengths in tokens (k per prompt), for the length metrics.
        domains: each prompt's domain tag; with more than one domain, also `eval/accuracy/<domain>`
            (avg@k over that domain's prompts: a multi-teacher student against each teacher in its domain).
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
    if domains is not None:
        if len(domains) != len(scores):
            raise ValueError(f"{len(domains)} domain tags for {len(scores)} prompts")
        if len(set(domains)) > 1:
            for d in sorted(set(domains)):
                mine = [sum(s) / len(s) for s, dd in zip(scores, domains) if dd == d]
                metrics[DOMAIN_ACCURACY_PREFIX + d] = sum(mine) / len(mine)
    return metrics
