"""Running Megatron models over micro-batches: one function for forward-only scoring and
forward+backward training, with pipeline parallelism handled by megatron-core's schedules.

Loss normalisation is ours, not Megatron's: every loss megatron_opd computes is already divided by the
*global* token/sequence count of the optimizer step (see objectives.policy_loss.aggregate_loss). So the
schedule must neither divide by the number of micro-batches nor average over data-parallel ranks:
`calculate_per_token_loss=True` turns both off (DDP then sums gradients) and our finalize hook passes
no token count, so megatron does not rescale the gradients either.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


def _finalize_grads_without_token_scaling(models, num_tokens=None, **kwargs):
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(models, None, **kwargs)


def prepare_for_training(model) -> None:
    """Configure a (DDP-wrapped) student so the schedules apply no normalisation of their own."""
    config = model.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = _finalize_grads_without_token_scaling
    if hasattr(model, "no_sync"):
        config.no_sync_func = model.no_sync


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s] positions 0..s-1 (right-padded sequences: padding sits after the tokens)."""
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


def run_micro_batches(
    model: torch.nn.Module,
    micro_batches: list[dict],
    loss_fn: Callable[[dict, torch.Tensor], tuple[torch.Tensor, dict]],
    forward_only: bool,
) -> list[dict]:
    """Run `model` over micro-batches with megatron's (pipeline) schedule.

    Args:
        model: this rank's model chunk (GPTModel or its DDP wrapper).
        micro_batches: dicts with at least "input_ids" [b, s]; every micro-batch must share one
            padded shape [b, s] when pipeline parallelism is on (the stages exchange [s, b, H]).
        loss_fn: on the last pipeline stage, called as loss_fn(micro_batch, logits [b, s, V/tp]) and
            returns (scalar loss, dict of outputs); the dicts are returned in order.
        forward_only: score without building a graph (teacher, reference, old student).

    Returns:
        The loss_fn output dicts on the last pipeline stage; an empty list on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    b, s = micro_batches[0]["input_ids"].shape
    for i, mb in enumerate(micro_batches):
        if tuple(mb["input_ids"].shape) != (b, s):
            raise ValueError(
                f"micro_batches[{i}].input_ids has shape {tuple(mb['input_ids'].shape)}, expected "
                f"{(b, s)}: pad every micro-batch of a step to one shape"
            )

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        ids = mb["input_ids"]
        output = chunk(input_ids=ids, position_ids=position_ids_for(ids), attention_mask=None)

        def loss_func(logits):
            loss, out = loss_fn(mb, logits)
            # (loss, num_tokens, reduced dict): with calculate_per_token_loss the schedule does not
            # rescale; the dummy count is unused by our finalize hook.
            return loss, torch.ones((), dtype=torch.int, device=logits.device), out

        return output, loss_func

    fwd_bwd = get_forward_backward_func()
    if forward_only:
        ctx = torch.no_grad()
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        outputs = fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=s,
            micro_batch_size=b,
            forward_only=forward_only,
        )
    return list(outputs or [])
