"""Exact per-token KL between student and teacher over the whole vocabulary, vocabulary-parallel.

Student and teacher share the TP layout, so rank r holds both models' LM-head rows for the same
vocabulary slice `[r * V/tp, (r + 1) * V/tp)`. For every response position, with logits z_s, z_t over
the valid vocabulary:

    log p_s = z_s - logZ_s ,  log p_t = z_t - logZ_t         (softmax over the whole vocabulary)
    reverse KL(p_s || p_t) = sum_V p_s (z_s - z_t) - (logZ_s - logZ_t)
    forward KL(p_t || p_s) = sum_V p_t (z_t - z_s) - (logZ_t - logZ_s)

Top-k: the KL between the two distributions coarsened to the teacher's global top-k tokens M (one
bucket each) and a tail bucket holding the rest of each model's mass, P_tail = 1 - sum_M p_s and
Q_tail = 1 - sum_M p_t:

    reverse KL_k = sum_M p_s (log p_s - log p_t) + P_tail (log P_tail - log Q_tail)

(and forward alike). It is a lower bound of the full KL (coarsening loses information) and sees mass
the student moves outside the teacher's top-k: renormalising both on M alone would call a student that
puts 97 % of its mass on one token outside M identical to the teacher (KL 0, zero gradient there).

Per token chunk: one all-reduce(MAX) of the maxima, one all-reduce(SUM) of the partial sums (three;
five for top-k, with the tails' own maxima so that a tail far below the top-k does not underflow), and
for top-k one all-gather of [chunk, k] candidate values: O(tokens x k) communication, never O(tokens x V). Each chunk's logits of *both* models are computed from the final hidden states and
the LM-head shards, reduced and dropped; backward recomputes them. So neither model's `[tokens, V/tp]`
logits exist at once: the peak is a few `[chunk, V/tp]` fp32 buffers.

Gradient with respect to the student's logits (the teacher is frozen), per token j of bucket b(j):
    reverse:  p_s,j ((log P_b(j) - log Q_b(j)) - KL)       (P_b = p_s,j for j in M, P_tail outside)
    forward:  p_s,j - p_s,j Q_b(j) / P_b(j)                (= p_s,j - p_t,j for j in M)
It flows into the student's hidden states (all-reduced over TP: they are replicated) and its LM-head
shard.

Pure torch + explicit process groups; `tp_group=None` runs in one process.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from megatron_opd.logprobs import (_chunk_grad as _token_logprob_grad, _group_rank, _group_size, _lm_head,
                                   _local_target_logit, _masked_fp32_logits, _validate, fused_chunk_bytes,
                                   lm_head_input_grads)

DIRECTIONS = ("reverse", "forward")


def _support_threshold(z_t: torch.Tensor, top_k: Optional[int], group) -> Optional[torch.Tensor]:
    """Per-token value of the teacher's global k-th largest logit ([c]); None = the whole vocabulary.

    Each rank's local top-k candidates are all-gathered, so the global top-k is exact (ties at the
    threshold keep every tied token)."""
    if top_k is None:
        return None
    k_local = min(top_k, z_t.shape[-1])
    local = z_t.topk(k_local, dim=-1).values  # [c, k]
    if _group_size(group) > 1:
        parts = [torch.empty_like(local) for _ in range(_group_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        local = torch.cat(parts, dim=-1)  # [c, k * tp]
    return local.topk(min(top_k, local.shape[-1]), dim=-1).values[:, -1]


def _chunk_logits(h_s, w_s, h_t, w_t, vocab_start, valid_vocab_size, top_k, group, threshold=None):
    """Both models' fp32 logits of one chunk over the whole vocabulary (padding at -inf), and for top-k
    the teacher's k-th largest logit per token (computed once in forward, reused in backward)."""
    z_t = _masked_fp32_logits(_lm_head(h_t, w_t, False), vocab_start, valid_vocab_size)  # [c, V/tp]
    z_s = _masked_fp32_logits(_lm_head(h_s, w_s, False), vocab_start, valid_vocab_size)  # [c, V/tp]
    if threshold is None:
        threshold = _support_threshold(z_t, top_k, group)
    return z_s, z_t, threshold


def _log_partition(z_s: torch.Tensor, z_t: torch.Tensor, threshold: Optional[torch.Tensor], direction: str,
                   group):
    """Global (logZ_s, logZ_t, KL, log tails) of one chunk, two collectives. `threshold` [c]: the top-k
    support M = {z_t >= threshold} with the tail bucket (module docstring); None: the whole vocabulary
    (log tails None). Log tails: [2, c] = (log P_tail, log Q_tail), -inf where the tail is empty."""
    outside = None if threshold is None else z_t < threshold.unsqueeze(-1)  # [c, V/tp]; padding too
    maxima = [z_s.max(-1).values, z_t.max(-1).values]
    if outside is not None:  # the tails' own maxima: their sums must not underflow below the top-k's
        maxima += [z_s.masked_fill(~outside, float("-inf")).max(-1).values,
                   z_t.masked_fill(~outside, float("-inf")).max(-1).values]
    m = torch.stack(maxima)  # [2 or 4, c]
    if _group_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e_s = (z_s - m[0].unsqueeze(-1)).exp()  # 0 at padding
    e_t = (z_t - m[1].unsqueeze(-1)).exp()
    diff = torch.where(torch.isfinite(z_s), z_s - z_t, torch.zeros_like(z_s))  # -inf - -inf guarded
    weights = e_s if direction == "reverse" else e_t
    if outside is not None:
        weights = weights.masked_fill(outside, 0.0)  # sum over M only
    sums = [e_s.sum(-1), e_t.sum(-1), (weights * diff).sum(-1)]
    if outside is not None:
        tail_max = torch.where(torch.isfinite(m[2:]), m[2:], torch.zeros_like(m[2:]))  # [2, c]; empty tail: 0
        sums += [(z_s - tail_max[0].unsqueeze(-1)).exp().masked_fill(~outside, 0.0).sum(-1),
                 (z_t - tail_max[1].unsqueeze(-1)).exp().masked_fill(~outside, 0.0).sum(-1)]
    sums = torch.stack(sums)  # [3 or 5, c]
    if _group_size(group) > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    log_z_s, log_z_t = m[0] + sums[0].log(), m[1] + sums[1].log()
    if outside is None:
        if direction == "reverse":
            return log_z_s, log_z_t, sums[2] / sums[0] - (log_z_s - log_z_t), None
        return log_z_s, log_z_t, -sums[2] / sums[1] - (log_z_t - log_z_s), None
    log_tails = torch.stack([tail_max[0] + sums[3].log() - log_z_s, tail_max[1] + sums[4].log() - log_z_t])
    tails = log_tails.exp()  # [2, c] (P_tail, Q_tail)
    if direction == "reverse":  # sum_M p_s (z_s - z_t) - P_M (logZ_s - logZ_t) + P_tail log(P_tail / Q_tail)
        tail_term = torch.where(tails[0] > 0, tails[0] * (log_tails[0] - log_tails[1]), torch.zeros_like(tails[0]))
        kl = sums[2] / sums[0] - (1 - tails[0]) * (log_z_s - log_z_t) + tail_term
    else:
        tail_term = torch.where(tails[1] > 0, tails[1] * (log_tails[1] - log_tails[0]), torch.zeros_like(tails[1]))
        kl = -sums[2] / sums[1] - (1 - tails[1]) * (log_z_t - log_z_s) + tail_term
    return log_z_s, log_z_t, kl, log_tails


def _chunk_grad(z_s, z_t, log_z_s, log_z_t, kl, g, direction, threshold=None, log_tails=None):
    """d(sum_i g_i KL_i) / d z_s of one chunk [c, V/tp] from the saved global statistics (top-k: the
    support's `threshold` and the `log_tails` of `_log_partition`)."""
    log_p = z_s - log_z_s.unsqueeze(-1)  # [c, V/tp]; -inf at padding
    log_q = z_t - log_z_t.unsqueeze(-1)
    p_s = log_p.exp()
    if threshold is not None:  # outside M each token belongs to its model's tail bucket
        outside = z_t < threshold.unsqueeze(-1)
        log_p = torch.where(outside, log_tails[0].unsqueeze(-1), log_p)
        log_q = torch.where(outside, log_tails[1].unsqueeze(-1), log_q)
    finite = torch.isfinite(z_s)
    if direction == "reverse":
        log_ratio = torch.where(finite, log_p - log_q, torch.zeros_like(z_s))
        grad = p_s * (log_ratio - kl.unsqueeze(-1))
    else:  # p_s,j (1 - Q_b / P_b)
        grad = p_s - torch.where(finite, p_s * (log_q - log_p).exp(), torch.zeros_like(z_s))
    return grad * g.unsqueeze(-1)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, vocab_start, valid_vocab_size, group, direction, top_k, chunk):
        n = h_s.shape[0]
        kl = torch.empty(n, dtype=torch.float32, device=h_s.device)
        log_z_s, log_z_t = torch.empty_like(kl), torch.empty_like(kl)
        thresholds = torch.empty_like(kl) if top_k is not None else None
        log_tails = torch.empty(2, n, dtype=torch.float32, device=h_s.device) if top_k is not None else None
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            z_s, z_t, thr = _chunk_logits(h_s[sl], w_s, h_t[sl], w_t, vocab_start, valid_vocab_size,
                                          top_k, group)
            log_z_s[sl], log_z_t[sl], kl[sl], tails = _log_partition(z_s, z_t, thr, direction, group)
            if thr is not None:
                thresholds[sl], log_tails[:, sl] = thr, tails
            del z_s, z_t  # one chunk's logits alive at a time
        ctx.save_for_backward(h_s, w_s, h_t, w_t, log_z_s, log_z_t, kl,
                              *([thresholds, log_tails] if thresholds is not None else []))
        ctx.meta = (vocab_start, valid_vocab_size, group, direction, top_k, chunk)
        return kl

    @staticmethod
    def backward(ctx, g_kl):
        vocab_start, valid_vocab_size, group, direction, top_k, chunk = ctx.meta
        h_s, w_s, h_t, w_t, log_z_s, log_z_t, kl, *rest = ctx.saved_tensors
        thresholds, log_tails = rest if rest else (None, None)
        g_kl = g_kl.float()
        grad_hidden = torch.empty_like(h_s)
        grad_weight = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device)
        for s in range(0, h_s.shape[0], chunk):
            sl = slice(s, s + chunk)
            thr = thresholds[sl] if thresholds is not None else None
            z_s, z_t, _ = _chunk_logits(h_s[sl], w_s, h_t[sl], w_t, vocab_start, valid_vocab_size, top_k,
                                        group, thr)
            gz = _chunk_grad(z_s, z_t, log_z_s[sl], log_z_t[sl], kl[sl], g_kl[sl], direction, thr,
                             log_tails[:, sl] if thr is not None else None)
            del z_s, z_t
            gh, gw = lm_head_input_grads(gz, h_s[sl], w_s)
            grad_hidden[sl] = gh
            grad_weight += gw
        if _group_size(group) > 1:  # replicated hidden states: sum the vocabulary slices' shares
            dist.all_reduce(grad_hidden, group=group)
        return grad_hidden, grad_weight.to(w_s.dtype), None, None, None, None, None, None, None, None


def _check_inputs_and_chunk(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, direction: str,
                            top_k: Optional[int], chunk_size, buffers_per_chunk: int) -> int:
    """Refuse inconsistent shapes or settings, naming the argument; return the tokens per chunk ("auto":
    `buffers_per_chunk` fp32 `[chunk, V/tp]` buffers within the fused log-prob path's budget)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: use one of {DIRECTIONS}")
    n, h = student_hidden.shape
    if teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}, expected [{n}, H_t] "
                         "(one row per student position)")
    if student_lm_head.dim() != 2 or student_lm_head.shape[1] != h:
        raise ValueError(f"student_lm_head has shape {tuple(student_lm_head.shape)}, expected [V/tp, {h}]")
    if teacher_lm_head.shape != (student_lm_head.shape[0], teacher_hidden.shape[1]):
        raise ValueError(f"teacher_lm_head has shape {tuple(teacher_lm_head.shape)}, expected "
                         f"[{student_lm_head.shape[0]}, {teacher_hidden.shape[1]}] (the student's "
                         "vocabulary slice, the teacher's hidden size)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    local_vocab = student_lm_head.shape[0]
    if chunk_size == "auto":
        budget = fused_chunk_bytes(local_vocab, max(h, teacher_hidden.shape[1])) // buffers_per_chunk
        return max(1, budget // (4 * local_vocab))
    if isinstance(chunk_size, int) and chunk_size > 0:
        return chunk_size
    raise ValueError(f"chunk_size must be a positive number of tokens or 'auto', got {chunk_size!r}")


def vocab_parallel_kl(
    student_hidden: torch.Tensor,
    student_lm_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.Tensor,
    tp_group=None,
    valid_vocab_size: Optional[int] = None,
    direction: str = "reverse",
    top_k: Optional[int] = None,
    chunk_size: Union[int, str] = "auto",
) -> torch.Tensor:
    """Exact per-token KL between the student's and the teacher's next-token distributions.

    Args:
        student_hidden: `[n, H_s]` final-norm hidden states at the response positions (with grad).
        student_lm_head: `[V/tp, H_s]` this rank's student LM-head rows (with grad).
        teacher_hidden: `[n, H_t]` the teacher's final-norm hidden states at the same positions.
        teacher_lm_head: `[V/tp, H_t]` this rank's teacher LM-head rows (frozen).
        tp_group: tensor-parallel group; None or size 1 = the whole vocabulary is local.
        valid_vocab_size: true vocabulary size; padded columns are excluded.
        direction: "reverse" = KL(student || teacher) (what OPD minimises), "forward" = KL(teacher ||
            student).
        top_k: the KL over the teacher's global top-k tokens and one tail bucket holding the rest of
            each model's mass (module docstring); None = the whole vocabulary.
        chunk_size: tokens per chunk, or "auto" (from the LM-head shard's size, as the fused
            log-prob path).

    Returns:
        `[n]` fp32 KL per token, differentiable w.r.t. the student's hidden states and LM head.
    """
    # both models' logits and two temporaries per chunk (top-k: two more for the tails' masked copies)
    chunk = _check_inputs_and_chunk(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, direction,
                                    top_k, chunk_size, buffers_per_chunk=6 if top_k else 4)
    local_vocab = student_lm_head.shape[0]
    vocab_start = _group_rank(tp_group) * local_vocab
    args = (student_hidden, student_lm_head, teacher_hidden.detach(), teacher_lm_head.detach(), vocab_start,
            valid_vocab_size, tp_group, direction, top_k, chunk)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_lm_head.requires_grad):
        return _VocabParallelKL.apply(*args)
    with torch.no_grad():
        from megatron_opd.logprobs import _NoCtx

        return _VocabParallelKL.forward(_NoCtx(), *args)


# ------------------------------------------------------------------------------------------------
# One pass for everything a step of the exact KL needs from the two LM heads
# ------------------------------------------------------------------------------------------------
class _VocabParallelKLAndLogprobs(torch.autograd.Function):
    """Per chunk, from one LM-head GEMM per model: the KL (top-k: over M and the tail), the student's
    log-prob of the sampled token (and entropy), and the teacher's log-prob of it. Backward recomputes
    both chunks once and sums the KL's and the log-prob's gradients in the student's logits."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, target, vocab_start, valid_vocab_size, group, direction, top_k,
                entropy, chunk):
        n = h_s.shape[0]
        new = lambda: torch.empty(n, dtype=torch.float32, device=h_s.device)  # noqa: E731
        kl, lp_s, lp_t, log_z_s, log_z_sm, log_z_tm = new(), new(), new(), new(), new(), new()
        mean_l = new() if entropy else None
        thresholds = new() if top_k is not None else None
        log_tails = torch.empty(2, n, dtype=torch.float32, device=h_s.device) if top_k is not None else None
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            z_t = _masked_fp32_logits(_lm_head(h_t[sl], w_t, False), vocab_start, valid_vocab_size)  # [c, V/tp]
            z_s = _masked_fp32_logits(_lm_head(h_s[sl], w_s, False), vocab_start, valid_vocab_size)  # [c, V/tp]
            thr = _support_threshold(z_t, top_k, group)
            # the sampled token's log-probs, whole vocabulary: maxima, then sums (two collectives)
            m = torch.stack([z_s.max(-1).values, z_t.max(-1).values])  # [2, c]
            if _group_size(group) > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            e_s = (z_s - m[0].unsqueeze(-1)).exp()
            sums = [e_s.sum(-1), (z_t - m[1].unsqueeze(-1)).exp().sum(-1),
                    _local_target_logit(z_s, target[sl], vocab_start)[0],
                    _local_target_logit(z_t, target[sl], vocab_start)[0]]
            if entropy:
                sums.append((e_s * z_s.masked_fill(e_s == 0, 0.0)).sum(-1))
            del e_s
            stacked = torch.stack(sums)  # [4 or 5, c]
            if _group_size(group) > 1:
                dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
            log_z_s[sl] = m[0] + stacked[0].log()
            lp_s[sl] = stacked[2] - log_z_s[sl]
            lp_t[sl] = stacked[3] - (m[1] + stacked[1].log())
            if entropy:
                mean_l[sl] = stacked[4] / stacked[0]
            # the KL (the same chunks; top-k: over M and the tail bucket)
            log_z_sm[sl], log_z_tm[sl], kl[sl], tails = _log_partition(z_s, z_t, thr, direction, group)
            if thr is not None:
                thresholds[sl], log_tails[:, sl] = thr, tails
            del z_s, z_t
        ctx.save_for_backward(h_s, w_s, h_t, w_t, target, log_z_s, log_z_sm, log_z_tm, kl,
                              *([mean_l] if entropy else []),
                              *([thresholds, log_tails] if top_k is not None else []))
        ctx.meta = (vocab_start, valid_vocab_size, group, direction, top_k, entropy, chunk)
        ent = (log_z_s - mean_l) if entropy else torch.zeros(0, device=h_s.device)
        return kl, lp_s, ent, lp_t

    @staticmethod
    def backward(ctx, g_kl, g_lp, g_ent, _g_lp_t):
        vocab_start, valid_vocab_size, group, direction, top_k, entropy, chunk = ctx.meta
        h_s, w_s, h_t, w_t, target, log_z_s, log_z_sm, log_z_tm, kl, *rest = ctx.saved_tensors
        mean_l = rest.pop(0) if entropy else None
        thresholds, log_tails = (rest.pop(0), rest.pop(0)) if top_k is not None else (None, None)
        zeros = torch.zeros_like(kl)
        g_kl = g_kl.float() if g_kl is not None else zeros
        g_lp = g_lp.float() if g_lp is not None else zeros
        use_ent = entropy and g_ent is not None and g_ent.numel() > 0
        grad_hidden = torch.empty_like(h_s)
        grad_weight = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device)
        for s in range(0, h_s.shape[0], chunk):
            sl = slice(s, s + chunk)
            z_t = _masked_fp32_logits(_lm_head(h_t[sl], w_t, False), vocab_start, valid_vocab_size)
            z_s = _masked_fp32_logits(_lm_head(h_s[sl], w_s, False), vocab_start, valid_vocab_size)
            gz = _token_logprob_grad(z_s, target[sl], vocab_start, log_z_s[sl], mean_l[sl] if use_ent else None,
                                     g_lp[sl], g_ent[sl].float() if use_ent else None)  # [c, V/tp]
            thr = thresholds[sl] if thresholds is not None else None
            gz += _chunk_grad(z_s, z_t, log_z_sm[sl], log_z_tm[sl], kl[sl], g_kl[sl], direction, thr,
                              log_tails[:, sl] if thr is not None else None)
            del z_s, z_t
            gh, gw = lm_head_input_grads(gz, h_s[sl], w_s)
            grad_hidden[sl] = gh
            grad_weight += gw
        if _group_size(group) > 1:  # replicated hidden states: sum the vocabulary slices' shares
            dist.all_reduce(grad_hidden, group=group)
        return (grad_hidden, grad_weight.to(w_s.dtype), None, None, None, None, None, None, None, None, None,
                None)


def vocab_parallel_kl_and_logprobs(
    student_hidden: torch.Tensor,
    student_lm_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    valid_vocab_size: Optional[int] = None,
    direction: str = "reverse",
    top_k: Optional[int] = None,
    compute_entropy: bool = False,
    chunk_size: Union[int, str] = "auto",
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """`vocab_parallel_kl` and, from the same chunks, the log-probs of the sampled tokens: one LM-head
    GEMM per model and token in forward, one more in backward (computing them separately ran the
    teacher's head three times and the student's four).

    Args: as `vocab_parallel_kl`, plus
        target_ids: `[n]` the sampled token at each position (global ids).
        compute_entropy: also the student's entropy over the whole vocabulary.

    Returns:
        `(kl [n], student log p(target) [n], student entropy [n] or None, teacher log p(target) [n])`,
        fp32. The KL is over the whole vocabulary, or for top-k over the teacher's top-k and the tail
        bucket; the log-probs over the whole valid vocabulary. Differentiable w.r.t. the student's hidden states and LM head through
        the KL, the student's log-probs and its entropy; the teacher's log-probs carry no gradient.
    """
    # both models' logits and two temporaries per chunk (top-k: two more for the tails' masked copies)
    chunk = _check_inputs_and_chunk(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, direction,
                                    top_k, chunk_size, buffers_per_chunk=6 if top_k else 4)
    local_vocab = student_lm_head.shape[0]
    _validate(target_ids, (student_hidden.shape[0],), chunk, valid_vocab_size, local_vocab, _group_size(tp_group))
    vocab_start = _group_rank(tp_group) * local_vocab
    args = (student_hidden, student_lm_head, teacher_hidden.detach(), teacher_lm_head.detach(),
            target_ids.reshape(-1).long(), vocab_start, valid_vocab_size, tp_group, direction, top_k,
            compute_entropy, chunk)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_lm_head.requires_grad):
        kl, lp_s, ent, lp_t = _VocabParallelKLAndLogprobs.apply(*args)
    else:
        with torch.no_grad():
            from megatron_opd.logprobs import _NoCtx

            kl, lp_s, ent, lp_t = _VocabParallelKLAndLogprobs.forward(_NoCtx(), *args)
    return kl, lp_s, (ent if compute_entropy else None), lp_t
