"""Vocabulary-parallel log-probability of the sampled token (and the student's entropy).

Each tensor-parallel rank holds logits for its vocabulary slice `[tokens, V/tp]`. For the sampled token
y of every position:

    m      = max_v l_v                    local max   -> all-reduce(MAX)
    S      = sum_v exp(l_v - m)           local sum   -> all-reduce(SUM)
    l_y    = logit of y                   owner rank  -> all-reduce(SUM)
    E[l]   = sum_v p_v l_v                (entropy)   -> all-reduce(SUM), same collective as S
    log p(y) = l_y - m - log S ;   H = m + log S - E[l]

Communication is O(tokens), never O(tokens x vocab): no rank sees another rank's slice. The work is
chunked over tokens, so the fp32 temporaries are [chunk, V/tp], and the backward recomputes the
softmax per chunk from the logits and three saved per-token statistics (no softmax is stored).
Columns past the true vocabulary (Megatron pads V to a multiple of tp x make_vocab_size_divisible_by)
are masked to -inf: they never enter the softmax and get zero gradient.

`fused_lm_head_token_logprobs` goes one step further and takes the final hidden states and the LM-head
weight shard, so full `[tokens, V/tp]` logits never exist at once: each chunk's logits are computed,
reduced and dropped, and recomputed in backward.

Pure torch + explicit process groups: with `tp_group=None` (or a group of size 1) everything runs in
one process.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Union

import torch
import torch.distributed as dist

from megatron_opd.checks import require

# chunk_size="auto" picks tokens per chunk from a byte budget for one fp32 `[chunk, V/tp]` buffer; a
# fixed token count is wrong both ways (4096 tokens of a 152k vocabulary is 2.5 GB). Measured on CPU
# (forward, fp32, one process; `benchmarks/bench_logprobs.py --chunk-sweep TOKENS,VOCAB,HIDDEN`):
# - from logits, the softmax passes run ~2x faster when a chunk stays cache-sized: 8-9 MiB chunks took
#   0.33 s vs 0.67-0.73 s for 37-594 MiB chunks at 2048 x 151,936, and 0.032 s vs 0.072 s at 1024 x 32,000;
# - fused with the LM head, every chunk re-reads the whole weight shard, so chunks must be large where
#   the weight is: 1.10x the bare matmul at 512-1024 tokens vs 1.39x at 256 (4096 x 151,936 x 2,560),
#   while a 65 MB weight does best at 256 tokens (1.03x). Budget: half the fp32 weight, in [8, 512] MiB.
# On GPU (not measured here) kernels do not depend on a CPU cache and every chunk costs TP collectives,
# so both paths use the 512 MiB budget there.
DEFAULT_CHUNK_BYTES = 8 * 2**20
FUSED_CHUNK_BYTES_MAX = 512 * 2**20


def auto_chunk_size(local_vocab: int, budget_bytes: Optional[int] = None) -> int:
    """Tokens per chunk so that an fp32 `[chunk, local_vocab]` buffer fits in `budget_bytes`
    (default DEFAULT_CHUNK_BYTES)."""
    budget = DEFAULT_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (4 * max(local_vocab, 1)))


def fused_chunk_bytes(local_vocab: int, hidden: int) -> int:
    """The fused path's budget: half the fp32 LM-head shard, within
    [DEFAULT_CHUNK_BYTES, FUSED_CHUNK_BYTES_MAX]."""
    return int(min(max(2 * local_vocab * hidden, DEFAULT_CHUNK_BYTES), FUSED_CHUNK_BYTES_MAX))


def _resolve_chunk(chunk_size, n_tokens: int, local_vocab: int, budget_bytes: Optional[int] = None) -> int:
    if chunk_size == "auto":
        return auto_chunk_size(local_vocab, budget_bytes)
    return chunk_size or max(n_tokens, 1)


# ------------------------------------------------------------------------------------------------
# math (no communication)
# ------------------------------------------------------------------------------------------------
def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _group_rank(group) -> int:
    return dist.get_rank(group) if _group_size(group) > 1 else 0


def _masked_fp32_logits(logits: torch.Tensor, vocab_start: int, valid_vocab_size: Optional[int]) -> torch.Tensor:
    """[n, V/tp] -> fp32 with padded vocabulary columns at -inf."""
    x = logits.float()
    if valid_vocab_size is not None:
        n_valid_local = valid_vocab_size - vocab_start
        if n_valid_local < x.shape[-1]:
            x = x.clone() if x.data_ptr() == logits.data_ptr() else x
            x[:, max(n_valid_local, 0):] = float("-inf")
    return x


def _local_target_logit(x: torch.Tensor, target: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit of each target on this rank's slice (0 where another rank owns it) and the local index."""
    local = target - vocab_start
    owned = (local >= 0) & (local < x.shape[-1])
    idx = local.clamp(0, x.shape[-1] - 1)
    picked = x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return torch.where(owned, picked, torch.zeros_like(picked)), idx.masked_fill(~owned, -1)


def _chunk_stats(x: torch.Tensor, target: torch.Tensor, vocab_start: int, group, entropy: bool,
                 scratch: bool = False):
    """Global (logZ, l_y, E[l]) of one fp32 chunk [n, V/tp]; two collectives.

    scratch=True lets the chunk be overwritten (the fused path owns its freshly computed logits), so
    the exp happens in place and the peak is one [n, V/tp] buffer instead of two.
    """
    m = x.max(dim=-1).values  # [n]
    if _group_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    l_y, _ = _local_target_logit(x, target, vocab_start)
    if entropy:
        e = (x - m.unsqueeze(-1)).exp_()  # exp(-inf) = 0 for padded columns
        # sum p*l with p unnormalised; guard -inf * 0 on padded columns.
        pl = (e * x.masked_fill(e == 0, 0.0)).sum(-1)
        sums = [e.sum(-1), l_y, pl]
    else:
        e = x.sub_(m.unsqueeze(-1)).exp_() if scratch else (x - m.unsqueeze(-1)).exp_()
        sums = [e.sum(-1), l_y]
    stacked = torch.stack(sums)  # [2 or 3, n]
    if _group_size(group) > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    log_z = m + stacked[0].log()
    mean_l = stacked[2] / stacked[0] if entropy else None
    return log_z, stacked[1], mean_l


def _chunk_grad(x, target, vocab_start, log_z, mean_l, g_lp, g_ent):
    """d(loss)/d(logits) of one fp32 chunk, from saved global statistics (no communication).

    d log p(y) / d l_j = 1[j = y] - p_j ;   d H / d l_j = -p_j (l_j - E[l]).
    """
    p = (x - log_z.unsqueeze(-1)).exp()  # padded columns: exp(-inf) = 0
    grad = -p * g_lp.unsqueeze(-1)
    if g_ent is not None:
        safe_x = torch.where(p > 0, x, torch.zeros_like(x))
        grad = grad - p * (safe_x - mean_l.unsqueeze(-1)) * g_ent.unsqueeze(-1)
    _, idx = _local_target_logit(x, target, vocab_start)
    owned = idx >= 0  # this rank's slice holds the target: + g at its column (no host read)
    grad.scatter_add_(1, idx.clamp(min=0).unsqueeze(1), torch.where(owned, g_lp, torch.zeros_like(g_lp)).unsqueeze(1))
    return grad


# ------------------------------------------------------------------------------------------------
# autograd functions (communication lives here)
# ------------------------------------------------------------------------------------------------
class _VocabParallelTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, valid_vocab_size, group, entropy, chunk):
        n = logits.shape[0]
        log_z = torch.empty(n, dtype=torch.float32, device=logits.device)
        l_y = torch.empty_like(log_z)
        mean_l = torch.empty_like(log_z) if entropy else None
        for s in range(0, n, chunk):
            x = _masked_fp32_logits(logits[s : s + chunk], vocab_start, valid_vocab_size)
            lz, ly, ml = _chunk_stats(x, target[s : s + chunk], vocab_start, group, entropy)
            log_z[s : s + chunk], l_y[s : s + chunk] = lz, ly
            if entropy:
                mean_l[s : s + chunk] = ml
        logprobs = l_y - log_z
        ent = log_z - mean_l if entropy else None
        ctx.save_for_backward(logits, target, log_z, *( [mean_l] if entropy else []))
        ctx.meta = (vocab_start, valid_vocab_size, entropy, chunk)
        if entropy:
            return logprobs, ent
        return logprobs, torch.zeros(0, device=logits.device)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        vocab_start, valid_vocab_size, entropy, chunk = ctx.meta
        logits, target, log_z, *rest = ctx.saved_tensors
        mean_l = rest[0] if entropy else None
        grad = torch.empty_like(logits)
        g_lp = g_lp.float() if g_lp is not None else torch.zeros_like(log_z)
        use_ent = entropy and g_ent is not None and g_ent.numel() > 0
        for s in range(0, logits.shape[0], chunk):
            sl = slice(s, s + chunk)
            x = _masked_fp32_logits(logits[sl], vocab_start, valid_vocab_size)
            gc = _chunk_grad(x, target[sl], vocab_start, log_z[sl], mean_l[sl] if use_ent else None,
                             g_lp[sl], g_ent[sl].float() if use_ent else None)
            grad[sl] = gc.to(grad.dtype)
        return grad, None, None, None, None, None, None


class _FusedLMHeadTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_start, valid_vocab_size, group, entropy, chunk, fp8):
        n = hidden.shape[0]
        log_z = torch.empty(n, dtype=torch.float32, device=hidden.device)
        l_y = torch.empty_like(log_z)
        mean_l = torch.empty_like(log_z) if entropy else None
        for s in range(0, n, chunk):
            logits = _lm_head(hidden[s : s + chunk], weight, fp8)  # [c, V/tp]
            x = _masked_fp32_logits(logits, vocab_start, valid_vocab_size)
            lz, ly, ml = _chunk_stats(x, target[s : s + chunk], vocab_start, group, entropy, scratch=True)
            log_z[s : s + chunk], l_y[s : s + chunk] = lz, ly
            if entropy:
                mean_l[s : s + chunk] = ml
            del logits, x  # free this chunk before the next GEMM allocates its own (peak: one chunk)
        ctx.save_for_backward(hidden, weight, target, log_z, *([mean_l] if entropy else []))
        ctx.meta = (vocab_start, valid_vocab_size, group, entropy, chunk, fp8)
        lp = l_y - log_z
        return lp, (log_z - mean_l) if entropy else torch.zeros(0, device=hidden.device)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        vocab_start, valid_vocab_size, group, entropy, chunk, fp8 = ctx.meta
        hidden, weight, target, log_z, *rest = ctx.saved_tensors
        mean_l = rest[0] if entropy else None
        use_ent = entropy and g_ent is not None and g_ent.numel() > 0
        g_lp = g_lp.float() if g_lp is not None else torch.zeros_like(log_z)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], chunk):
            sl = slice(s, s + chunk)
            h = hidden[sl]
            x = _masked_fp32_logits(_lm_head(h, weight, fp8), vocab_start, valid_vocab_size)
            gl = _chunk_grad(x, target[sl], vocab_start, log_z[sl], mean_l[sl] if use_ent else None,
                             g_lp[sl], g_ent[sl].float() if use_ent else None)  # [c, V/tp] fp32
            gh, gw = lm_head_input_grads(gl, h, weight)
            grad_hidden[sl] = gh
            grad_weight += gw
        # The hidden state is replicated across TP ranks; each rank's gradient covers only its vocab
        # slice, so sum them (what ColumnParallelLinear's input region does in Megatron).
        if _group_size(group) > 1:
            dist.all_reduce(grad_hidden, group=group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None, None


def lm_head_input_grads(grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM-head GEMM's two backward GEMMs for one chunk: fp32 logit gradients `[c, V/tp]`, hidden
    `[c, H]`, weight `[V/tp, H]` -> (d hidden `[c, H]` in hidden's dtype, d weight `[V/tp, H]`).

    Both GEMMs run in the weight's dtype: a bf16 shard is never copied to fp32 (the GEMMs accumulate
    in fp32 internally); only the chunk's logit gradient is rounded to bf16, as in megatron's own
    vocab-parallel cross-entropy backward. The caller accumulates d weight over chunks in fp32."""
    g = grad_logits.to(weight.dtype)  # [c, V/tp]
    return (g @ weight).to(hidden.dtype), g.t() @ hidden.to(weight.dtype)


def _lm_head(hidden: torch.Tensor, weight: torch.Tensor, fp8: bool) -> torch.Tensor:
    """[c, H] x [V/tp, H]^T -> [c, V/tp]. FP8 (Transformer Engine, GPU only) behind a switch."""
    if fp8:
        return _te_fp8_lm_head(hidden, weight)
    return hidden @ weight.t()


def _transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


_TE_LINEARS: dict = {}


def _te_fp8_lm_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LM-head GEMM in FP8 through a Transformer Engine Linear that shares `weight` (GPU only).

    Only the forward logits (and their recomputation in backward) use FP8; the gradient GEMMs and
    every softmax reduction run in fp32. Not exercised on CPU: its test is marked `gpu`.
    """
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import DelayedScaling, Format
    except ImportError as exc:
        raise ValueError("fp8=True needs transformer-engine (pip install -e .[gpu])") from exc
    key = (weight.data_ptr(), tuple(weight.shape))
    linear = _TE_LINEARS.get(key)
    if linear is None:
        linear = te.Linear(weight.shape[1], weight.shape[0], bias=False, params_dtype=weight.dtype,
                           device=weight.device)
        linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)  # shares storage
        _TE_LINEARS[key] = linear
    with torch.no_grad(), te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID)):
        return linear(hidden.detach())


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def _validate(target: torch.Tensor, lead_shape, chunk_size, valid_vocab_size, local_vocab, tp_size):
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target_ids has shape {tuple(target.shape)}, expected {tuple(lead_shape)} "
                         "(the leading dimensions of logits / hidden)")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target_ids must be an integer tensor, got {target.dtype}")
    if chunk_size != "auto" and chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive number of tokens, 'auto' or None, got {chunk_size!r}")
    full_vocab = local_vocab * tp_size
    if valid_vocab_size is not None and not 0 < valid_vocab_size <= full_vocab:
        raise ValueError(f"valid_vocab_size={valid_vocab_size} must be in (0, {full_vocab}] "
                         f"(vocab slice {local_vocab} x tp {tp_size})")
    limit = valid_vocab_size if valid_vocab_size is not None else full_vocab
    require((target >= 0) & (target < limit), f"target_ids out of range: every id must be in [0, {limit})")


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    valid_vocab_size: Optional[int] = None,
    compute_entropy: bool = False,
    chunk_size: Union[int, str, None] = "auto",
    chunk_budget_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probability of each target token (and entropy) from vocabulary-parallel logits.

    Args:
        logits: `[..., V/tp]` this rank's vocabulary slice (e.g. `[s, b, V/tp]` or `[b, s, V/tp]`);
            rank r holds columns `[r * V/tp, (r + 1) * V/tp)`.
        target_ids: `[...]` global token ids.
        tp_group: tensor-parallel group; None or size 1 = the whole vocabulary is local.
        valid_vocab_size: true vocabulary size; columns at or past it are padding and excluded.
        compute_entropy: also return the entropy of the full distribution at each position.
        chunk_size: tokens per chunk (bounds fp32 temporaries to `[chunk, V/tp]`); "auto" = as many
            as fit `chunk_budget_bytes` (default DEFAULT_CHUNK_BYTES: cache-sized); None = no chunking.
        chunk_budget_bytes: the "auto" budget for one fp32 `[chunk, V/tp]` buffer; the caller, which
            knows where the tensors live, passes FUSED_CHUNK_BYTES_MAX for accelerator memory.

    Returns:
        `(logprobs [...], entropy [...] or None)`, fp32. Differentiable w.r.t. `logits` when it
        requires grad; under `torch.no_grad()` nothing is saved for backward.
    """
    *lead, local_vocab = logits.shape
    tp = _group_size(tp_group)
    _validate(target_ids, lead, chunk_size, valid_vocab_size, local_vocab, tp)
    vocab_start = _group_rank(tp_group) * local_vocab
    flat = logits.reshape(-1, local_vocab)  # [n, V/tp]
    target = target_ids.reshape(-1).long()
    chunk = _resolve_chunk(chunk_size, flat.shape[0], local_vocab, chunk_budget_bytes)
    if torch.is_grad_enabled() and logits.requires_grad:
        lp, ent = _VocabParallelTokenLogprobs.apply(
            flat, target, vocab_start, valid_vocab_size, tp_group, compute_entropy, chunk)
    else:  # teacher / reference fast path: no graph, nothing saved
        with torch.no_grad():
            lp, ent = _VocabParallelTokenLogprobs.forward(
                _NoCtx(), flat, target, vocab_start, valid_vocab_size, tp_group, compute_entropy, chunk)
    lp = lp.reshape(lead)
    return lp, (ent.reshape(lead) if compute_entropy else None)


def fused_lm_head_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    valid_vocab_size: Optional[int] = None,
    compute_entropy: bool = False,
    chunk_size: Union[int, str, None] = "auto",
    fp8: bool = False,
    chunk_budget_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Like `vocab_parallel_token_logprobs`, from final hidden states and the LM-head weight shard.

    Args:
        hidden: `[..., H]` final-norm hidden states (replicated across TP ranks).
        lm_head_weight: `[V/tp, H]` this rank's LM-head (output layer) rows.
        fp8: GPU only: run the LM-head GEMM in Transformer Engine FP8 (reductions stay fp32).
        chunk_budget_bytes: the "auto" budget (default `fused_chunk_bytes`: half the fp32 shard, within
            [8, 512] MiB); callers pass FUSED_CHUNK_BYTES_MAX for accelerator memory.

    The `[tokens, V/tp]` logits never exist at once: peak extra memory is `[chunk, V/tp]` fp32.
    The gradient w.r.t. `hidden` is all-reduced over `tp_group` (the input is replicated).
    """
    *lead, h = hidden.shape
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != h:
        raise ValueError(f"lm_head_weight has shape {tuple(lm_head_weight.shape)}, expected [V/tp, {h}] "
                         "to match hidden's last dimension")
    tp = _group_size(tp_group)
    _validate(target_ids, lead, chunk_size, valid_vocab_size, lm_head_weight.shape[0], tp)
    if fp8 and not _transformer_engine_installed():
        raise ValueError("fp8=True needs CUDA and Transformer Engine (pip install -e .[gpu]); set fp8=False")
    vocab_start = _group_rank(tp_group) * lm_head_weight.shape[0]
    flat = hidden.reshape(-1, h)
    target = target_ids.reshape(-1).long()
    budget = chunk_budget_bytes if chunk_budget_bytes is not None else fused_chunk_bytes(lm_head_weight.shape[0], h)
    chunk = _resolve_chunk(chunk_size, flat.shape[0], lm_head_weight.shape[0], budget)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    if needs_grad:
        lp, ent = _FusedLMHeadTokenLogprobs.apply(
            flat, lm_head_weight, target, vocab_start, valid_vocab_size, tp_group, compute_entropy,
            chunk, fp8)
    else:
        with torch.no_grad():
            lp, ent = _FusedLMHeadTokenLogprobs.forward(
                _NoCtx(), flat, lm_head_weight, target, vocab_start, valid_vocab_size, tp_group,
                compute_entropy, chunk, fp8)
    return lp.reshape(lead), (ent.reshape(lead) if compute_entropy else None)


class _NoCtx:
    """Stand-in autograd ctx for the no-grad path: saving is a no-op, so nothing is kept alive."""

    def save_for_backward(self, *tensors):
        pass
