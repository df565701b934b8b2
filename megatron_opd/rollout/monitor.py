"""Trainer-vs-vLLM log-prob mismatch: what token-level truncated importance sampling corrects.

Each step the trainer's own log-probs of a few rollout responses are compared with the log-probs vLLM
reported while sampling them. fp32 on both sides agrees to ~1e-4; bf16 engines differ by ~0.1-0.2.
"""

from __future__ import annotations

import torch


def logprob_gap(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """max and mean |trainer - vLLM| over response tokens (`[b, s]` each)."""
    if trainer_logprobs.shape != rollout_logprobs.shape or trainer_logprobs.shape != mask.shape:
        raise ValueError(f"shapes differ: trainer {tuple(trainer_logprobs.shape)}, rollout "
                         f"{tuple(rollout_logprobs.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool()
    if not m.any():
        return {"mismatch/max_abs": 0.0, "mismatch/mean_abs": 0.0}
    gap = (trainer_logprobs.float() - rollout_logprobs.float()).abs()[m]
    return {"mismatch/max_abs": gap.max().item(), "mismatch/mean_abs": gap.mean().item()}


def probe_rows(batch_size: int, probe_size: int) -> list[int]:
    """Rows of the batch re-scored for the monitor (evenly spaced, deterministic)."""
    if probe_size <= 0 or batch_size == 0:
        return []
    step = max(batch_size // probe_size, 1)
    return list(range(0, batch_size, step))[:probe_size]
