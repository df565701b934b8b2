"""How a replica's rollout sequences are cut into mini-batches (one optimizer update each) and
micro-batches (one forward/backward each). Pure: row indices in, row indices out.

Without a token budget, micro-batches are `max_rows` sequences in rollout order and the mini-batches
equal groups of them. With a budget, each mini-batch (an equal contiguous share of the rows) is sorted
by length, longest first, and cut greedily so that rows x longest <= budget (at most `max_rows` rows):
long sequences travel in small micro-batches, short ones in wide ones, and little of a micro-batch is
padding. The loss is normalised by the step's global token count, so the cut changes no result.

`MicroBatch` is the typed micro-batch the trainer, the scoring pass and the objectives pass along.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


def plan_micro_batches(lengths: list[int], mini_batches: int, max_rows: int,
                       max_tokens: Optional[int] = None) -> list[list[list[int]]]:
    """Row indices of every micro-batch of every mini-batch: `plan[m][k]` = rows of micro-batch k of
    mini-batch m.

    Args:
        lengths: tokens of each sequence (prompt + response), `[B]`.
        mini_batches: optimizer updates per rollout batch.
        max_rows: most sequences per micro-batch.
        max_tokens: token budget of a micro-batch (rows x its longest sequence); None = fixed rows.
    """
    B = len(lengths)
    if B == 0:
        return [[] for _ in range(mini_batches)]
    if max_tokens is None:
        micro = [list(range(i, min(i + max_rows, B))) for i in range(0, B, max_rows)]
        if len(micro) % mini_batches:
            raise ValueError(f"{len(micro)} micro-batches do not split into {mini_batches} mini-batches")
        per = len(micro) // mini_batches
        return [micro[m * per:(m + 1) * per] for m in range(mini_batches)]
    if B % mini_batches:
        raise ValueError(f"{B} sequences do not split into {mini_batches} mini-batches")
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(f"a sequence of {longest} tokens exceeds the micro-batch token budget {max_tokens}")
    per = B // mini_batches
    plan = []
    for m in range(mini_batches):
        rows = sorted(range(m * per, (m + 1) * per), key=lambda r: (-lengths[r], r))
        micro, current = [], []
        for r in rows:  # rows arrive longest first: the first row of a micro-batch sets its width
            if current and (len(current) == max_rows or (len(current) + 1) * lengths[current[0]] > max_tokens):
                micro.append(current)
                current = []
            current.append(r)
        micro.append(current)
        plan.append(micro)
    return plan


def padded_tokens(lengths: list[int], plan: list[list[list[int]]]) -> int:
    """Tokens the plan's micro-batches compute, padding included (sum of rows x longest)."""
    return sum(len(rows) * max(lengths[r] for r in rows) for mini in plan for rows in mini if rows)



@dataclass(kw_only=True)
class ForwardBatch:
    """What a forward pass over a micro-batch reads (`models.forward`)."""

    input_ids: torch.Tensor
    """[b, s] prompt + response tokens, right-padded."""

    mask: Optional[torch.Tensor] = None
    """[b, s-1] 1 where position t predicts a response token t+1 (None: a plain forward over every
    position, for parity checks and conversions)."""

    response_tokens: Optional[int] = None
    """mask.sum(), counted on the host where the batch is built (no device read to learn it); None: unknown."""

    def to(self, device):
        """This batch with every tensor (and tuple of tensors) on `device` (a new object)."""
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device, non_blocking=True)
            if isinstance(v, ForwardBatch):
                return v.to(device)
            if isinstance(v, tuple):
                return tuple(move(x) for x in v)
            return v

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass(kw_only=True)
class MicroBatch(ForwardBatch):
    """One micro-batch of a training step, built once per step by `OPDTrainer.micro_batches`, completed
    by scoring (what the objective's `needs` ask for; on the last pipeline stage) and by the objective's
    `prepare` (which returns new micro-batches, `dataclasses.replace`, rather than mutating them). Every
    per-position tensor is [b, s-1], aligned with `mask`."""

    rollout_logprobs: torch.Tensor
    """[b, s-1] the engine's log p of each sampled token (0 outside the mask)."""

    teacher_index: torch.Tensor
    """[b] which teacher scores each sample (multi-teacher routing by domain)."""

    outcome_rewards: torch.Tensor
    """[b] the verifier's reward of each response."""

    group: torch.Tensor
    """[b] the prompt each sample answers (GRPO's groups)."""

    mini: int = 0
    """The mini-batch (optimizer update) this micro-batch belongs to."""

    teacher_rows: tuple = ()
    """Per teacher, [rows] of this micro-batch it scores (host-built: no device read in scoring)."""

    teacher_tokens: tuple = ()
    """Per teacher, the response tokens of its rows."""

    teacher_views: tuple = ()
    """Per teacher, its `cross_tokenizer.CrossBatch` of the rows it scores (teachers[i].tokenizer: cross;
    None for a teacher with the student's tokenizer); () without cross-tokenizer teachers."""

    teacher_positions: tuple = ()
    """Per teacher (with several), [n_k] the indices of its rows' response positions among the n of this
    micro-batch (row-major, as `forward.gather_response` orders them), host-built; () with one teacher."""

    global_tokens: float = 0.0
    """Response tokens of the whole update (all micro-batches, all data-parallel replicas): the loss
    normaliser, so micro-batch losses and replica gradients sum to the full-batch objective."""

    global_seqs: float = 0.0
    """Sequences of the whole update (the seq-mean normaliser)."""

    # ---- scoring (each when the objective's needs ask for it)
    teacher_logprobs: Optional[torch.Tensor] = None
    """[b, s-1] the routed teacher's log p(sampled token) (needs.teachers, sampled estimator)."""

    teacher_hidden: tuple = ()
    """Per teacher, [n_k, H_k] its final hidden states at its rows' response positions (all n with one
    teacher; None where it has no row in this micro-batch) (needs.teacher_hidden)."""

    teacher_lm_head: tuple = ()
    """Per teacher, [V/tp, H_k] its LM-head shard (needs.teacher_hidden)."""

    reference_logprobs: Optional[torch.Tensor] = None
    """[b, s-1] the reference's log p(sampled token) (needs.reference)."""

    old_logprobs: Optional[torch.Tensor] = None
    """[b, s-1] pi_old's log p(sampled token), before the first update (needs.old_policy or mini-batches)."""

    old_entropy: Optional[torch.Tensor] = None
    """[b, s-1] pi_old's entropy at each position (with old_logprobs)."""

    old_hidden: Optional[torch.Tensor] = None
    """[n, H] pi_old's final hidden states at the response positions (ERPD's exact KL to pi_old)."""

    # ---- the objective's preparation (Objective.prepare)
    token_select: Optional[torch.Tensor] = None
    """[b, s-1] REOPOLD's selected tokens (1 kept)."""

    advantages: Optional[torch.Tensor] = None
    """[b] group-normalised advantages (GRPO, ERPD stage 1)."""

    signal: Optional[torch.Tensor] = None
    """[b, s-1] ERPD stage 2's stored token signal."""



def with_global_counts(micro: list[MicroBatch], dp_group=None, at_least: float = 0.0) -> list[MicroBatch]:
    """The micro-batches with each update's global counts: the response tokens and sequences of all the
    micro-batches of its mini-batch on every data-parallel replica (`dp_group`), at least `at_least`
    (a batch whose masks are all empty still divides by something). One all-reduce per mini-batch."""
    from megatron_opd.objectives.policy_loss import global_counts

    out = list(micro)
    for m in sorted({mb.mini for mb in micro}):
        idx = [i for i, mb in enumerate(micro) if mb.mini == m]
        tokens, seqs = global_counts([micro[i].mask for i in idx], dp_group)
        for i in idx:
            out[i] = dataclasses.replace(micro[i], global_tokens=max(tokens, at_least), global_seqs=max(seqs, at_least))
    return out
