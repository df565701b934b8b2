"""Running Megatron models over micro-batches: one function for forward-only scoring and
forward+backward training, with pipeline parallelism handled by megatron-core's schedules.

Loss normalisation is ours, not Megatron's: every loss megatron_opd computes is already divided by the
*global* token/sequence count of the optimizer step (see objectives.policy_loss.aggregate_loss). So the
schedule must neither divide by the number of micro-batches nor average over data-parallel ranks:
`calculate_per_token_loss=True` turns both off (DDP then sums gradients) and our finalize hook passes
no token count, so megatron does not rescale the gradients either.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from megatron_opd import platform
from megatron_opd.batching import ForwardBatch
from megatron_opd.logprobs import FUSED_CHUNK_BYTES_MAX, fused_lm_head_token_logprobs, vocab_parallel_token_logprobs

LOGPROB_IMPLS = ("auto", "fused", "logits")


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
    micro_batches: list[ForwardBatch],
    loss_fn: Callable[[ForwardBatch, torch.Tensor], tuple[torch.Tensor, dict]],
    forward_only: bool,
    output: str = "logits",
) -> list[dict]:
    """Run `model` over micro-batches with megatron's (pipeline) schedule.

    Args:
        model: this rank's model chunk (GPTModel or its DDP wrapper).
        micro_batches: `batching.ForwardBatch` (or its `MicroBatch`); b and s may differ between
            micro-batches (token-budget micro-batches): under pipeline parallelism the stages then
            exchange each activation's shape first (megatron's `variable_seq_lengths`).
        loss_fn: on the last pipeline stage, called as loss_fn(micro_batch, out) and returns
            (scalar loss, dict of outputs); the dicts are returned in order.
        forward_only: score without building a graph (teacher, reference, old student).
        output: "logits": `out` is [b, s, V/tp]; "hidden": `out` is the final-norm hidden states
            [b, s, H] and the LM head is left to loss_fn (see `response_logprobs`).

    Returns:
        The loss_fn output dicts on the last pipeline stage; an empty list on other stages.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    if output not in ("logits", "hidden"):
        raise ValueError(f"output={output!r}: use 'logits' or 'hidden'")
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Stages exchange [s, b, H] activations whose shape changes from micro-batch to micro-batch.
        gpt_model(model).config.variable_seq_lengths = True

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        ids = mb.input_ids
        out = chunk(input_ids=ids, position_ids=position_ids_for(ids), attention_mask=None)

        def loss_func(out):
            loss, extra = loss_fn(mb, out)
            # (loss, num_tokens, reduced dict): with calculate_per_token_loss the schedule does not
            # rescale; the dummy count is unused by our finalize hook.
            return loss, torch.ones((), dtype=torch.int, device=out.device), extra

        return out, loss_func

    b, s = micro_batches[0].input_ids.shape
    fwd_bwd = get_forward_backward_func()
    grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    head_ctx = lm_head_bypassed(model) if output == "hidden" else contextlib.nullcontext()
    with grad_ctx, head_ctx:
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


# ------------------------------------------------------------------------------------------------
# log-probs of the response tokens, from hidden states (fused LM head) or from logits
# ------------------------------------------------------------------------------------------------
def gpt_model(model: torch.nn.Module):
    """The GPTModel inside a (DDP / Float16Module) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's LM-head rows [V/tp, H] (the shared embedding when the model ties them)."""
    gpt = gpt_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def lm_head_bypassed(model: torch.nn.Module):
    """Inside, the last stage's GPTModel returns final-norm hidden states [b, s, H] instead of logits.

    Workaround, isolated here: megatron-core 0.16's GPTModel has no switch that returns the hidden
    states of a training forward (only `labels` -> its own cross-entropy), so the output layer's
    forward is swapped for a pass-through for the duration of the call. The LM-head GEMM then runs in
    `fused_lm_head_token_logprobs` on the response positions only. Its input-gradient all-reduce over
    TP is done there; under sequence parallelism the hidden states are all-gathered here first (the
    gather's backward keeps this rank's slice of the already-summed gradient).
    """
    gpt = gpt_model(model)
    if not gpt.post_process:
        yield
        return
    layer = gpt.output_layer
    if getattr(layer, "bias", None) is not None:
        raise ValueError("the fused LM-head path assumes an output layer without bias")
    sequence_parallel = bool(getattr(layer, "sequence_parallel", False))

    def passthrough(hidden_states, weight=None, runtime_gather_output=None):  # [s, b, H]
        if sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        return hidden_states, None

    layer.forward = passthrough
    try:
        yield
    finally:
        del layer.forward  # back to the class's forward


#: `logprob_impl: auto` uses the fused LM head from this many vocabulary columns per rank. Measured (README,
#: "One OPD step"): at 152k the fused step needs a fraction of the logits path's memory and is not slower;
#: at a 512-token vocabulary the two paths are within noise of each other, and materialised logits (a
#: few MB) let megatron's output layer run as one GEMM.
FUSED_MIN_LOCAL_VOCAB = 16384


def resolve_logprob_impl(impl: str, local_vocab: int) -> str:
    """"auto" -> "fused" from FUSED_MIN_LOCAL_VOCAB vocabulary columns per TP rank, else "logits"."""
    if impl not in LOGPROB_IMPLS:
        raise ValueError(f"logprob impl {impl!r}: use one of {LOGPROB_IMPLS}")
    if impl == "auto":
        return "fused" if local_vocab >= FUSED_MIN_LOCAL_VOCAB else "logits"
    return impl


def response_positions(mb: ForwardBatch, seq_len: int) -> torch.Tensor:
    """[n] flat indices, in the micro-batch's [b * seq_len] grid, of the positions whose next token is a
    response token (mb.mask [b, seq_len - 1] is 1 there). Without a host read when the micro-batch
    carries its count (`response_tokens`, set on the host where it is built): `nonzero_static` knows
    its output size; boolean indexing would have to ask the device."""
    mask = mb.mask
    grid = torch.nn.functional.pad(mask.bool(), (0, seq_len - mask.shape[1]))  # [b, seq_len]
    n = mb.response_tokens
    if n is None:
        return grid.reshape(-1).nonzero().squeeze(1)
    return torch.nonzero_static(grid.reshape(-1), size=int(n)).squeeze(1)


def gather_response(out: torch.Tensor, mb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`out` [b, s, X] -> (its rows at the response positions [n, X], their flat indices [n])."""
    b, s = out.shape[:2]
    idx = response_positions(mb, s)
    return out.reshape(b * s, -1).index_select(0, idx), idx


def uses_fp8_lm_head(fp8_recipe: Optional[str], impl: str) -> bool:
    """Whether the LM-head GEMM runs in FP8: `precision.fp8` set and the fused path (ours) computes the
    log-probs; with materialised logits megatron's own output layer does."""
    return fp8_recipe is not None and impl == "fused"


def response_logprobs(
    model: torch.nn.Module,
    out: torch.Tensor,
    mb: ForwardBatch,
    impl: str,
    tp_group=None,
    valid_vocab_size: Optional[int] = None,
    compute_entropy: bool = False,
    fp8: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(input_ids[:, t+1]) (and entropy) at the response positions of one micro-batch.

    Args:
        out: what `run_micro_batches(..., output=...)` hands the loss: hidden states [b, s, H] for
            impl "fused", logits [b, s, V/tp] for impl "logits".
        mb: the micro-batch: input_ids [b, s] and mask [b, s-1] (1 at response positions).
        fp8: impl "fused" only: the LM-head GEMM in Transformer Engine FP8 (`precision.fp8`, GPU).

    Returns:
        `(logprobs [b, s-1], entropy [b, s-1] or None)`, fp32, 0 outside the mask. Only the
        masked positions go through the LM head / softmax, so prompt and padding positions cost
        nothing past the last transformer layer.
    """
    mask = mb.mask.bool()  # [b, s-1]
    picked, idx = gather_response(out, mb)  # [n, H] or [n, V/tp]; positions in the [b * s] grid
    target = mb.input_ids.reshape(-1).index_select(0, idx + 1)  # [n] the token each position predicts
    # accelerator memory: large chunks (each costs TP collectives); host memory: cache-sized ones
    budget = FUSED_CHUNK_BYTES_MAX if platform.is_accelerator(out.device) else None
    if impl == "fused":
        lp, ent = fused_lm_head_token_logprobs(
            picked, lm_head_weight(model), target, tp_group=tp_group, valid_vocab_size=valid_vocab_size,
            compute_entropy=compute_entropy, fp8=fp8, chunk_budget_bytes=budget)
    elif impl == "logits":
        if fp8:
            raise ValueError("fp8 LM head needs the fused path (train.logprob_impl: fused or auto); megatron's "
                             "own output layer computes the materialised logits")
        lp, ent = vocab_parallel_token_logprobs(
            picked, target, tp_group=tp_group, valid_vocab_size=valid_vocab_size,
            compute_entropy=compute_entropy, chunk_budget_bytes=budget)
    else:
        raise ValueError(f"impl={impl!r}: resolve 'auto' with resolve_logprob_impl first")

    def scatter(values):  # [n] -> [b, s-1], differentiable
        return torch.zeros(mask.shape, dtype=torch.float32, device=values.device).masked_scatter(
            mask, values.float())

    return scatter(lp), (scatter(ent) if compute_entropy else None)
