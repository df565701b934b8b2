"""Per-token estimators of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3).

With x ~ pi and log r = lp_ref - lp:
    k1 = -log r                 unbiased, can be negative
    k2 = (log r)^2 / 2          biased, low variance
    k3 = (r - 1) - log r        unbiased, always >= 0
Gradients flow through `logprobs` (the policy); `ref_logprobs` is treated as a constant.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate `[b, s]`."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}: use one of {KL_ESTIMATORS}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected "
                         f"{tuple(logprobs.shape)} (the shape of logprobs)")
    log_r = (ref_logprobs.detach() - logprobs).clamp(-20.0, 20.0)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    return log_r.exp() - 1.0 - log_r
