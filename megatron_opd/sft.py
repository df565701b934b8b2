"""Supervised fine-tuning on (prompt, response) pairs with the same Megatron machinery as OPD.

Two uses: the off-policy distillation baseline (SFT on teacher samples), and the embedded demo, which
builds its own teacher and student by SFT on a synthetic task (no weights can be downloaded here).
The loss is the response-token negative log-likelihood, computed vocabulary-parallel.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from megatron_opd import parallel
from megatron_opd.batching import ForwardBatch


@dataclass
class SFTConfig:
    """Supervised fine-tuning run."""

    steps: int = 500
    """Optimizer steps."""

    batch_size: int = 32
    """Sequences per optimizer step (all ranks)."""

    micro_batch_size: int = 32
    """Sequences per forward/backward on one rank."""

    lr: float = 1e-3
    """Peak learning rate (cosine decay to lr/10 after a short warm-up)."""

    warmup_steps: int = 20
    """Linear warm-up steps."""

    seed: int = 0
    """Data order seed."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("sft.steps, sft.batch_size and sft.micro_batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError("sft.lr must be > 0")


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """Chat-format each (prompt, response) pair -> (token ids, prompt length)."""
    out = []
    eos = tokenizer.eos_token_id  # the chat's end of turn (<|im_end|> in ChatML, <|eot_id|> in Llama 3)
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token: SFT ends every response with it")
    for prompt, response in pairs:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
        resp_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        ids = (list(prompt_ids) + resp_ids)[:max_len]
        out.append((ids, len(prompt_ids)))
    return out


def _pad(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), S - 1)  # position t predicts token t+1
    for i, (ids, plen) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, plen - 1 : len(ids) - 1] = 1.0
    return input_ids, mask


def run_sft(
    student,
    optimizer,
    scheduler,
    examples: list[tuple[list[int], int]],
    cfg: SFTConfig,
    pad_id: int,
    vocab_size: int,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """Train a DDP-wrapped student on tokenized examples; returns the per-step losses."""
    from megatron_opd.logprobs import vocab_parallel_token_logprobs
    from megatron_opd.models.forward import run_micro_batches

    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses = []
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch = [examples[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        micro = []
        for i in range(0, len(batch), cfg.micro_batch_size):
            ids, mask = _pad(batch[i : i + cfg.micro_batch_size], pad_id)
            micro.append(ForwardBatch(input_ids=ids, mask=mask))
        total = sum(float(mb.mask.sum()) for mb in micro)

        def loss_fn(mb, logits):
            lp, _ = vocab_parallel_token_logprobs(
                logits[:, :-1], mb.input_ids[:, 1:], tp_group=parallel.tp_group(),
                valid_vocab_size=vocab_size,
            )  # [b, s-1]
            loss = -(lp.float() * mb.mask).sum() / total
            return loss, {"loss": loss.detach()}

        student.zero_grad_buffer()
        optimizer.zero_grad()
        outs = run_micro_batches(student, micro, loss_fn, forward_only=False)
        optimizer.step()
        scheduler.step(1)
        loss = sum(float(o["loss"]) for o in outs) if outs else math.nan
        losses.append(loss)
        if on_step:
            on_step(step, loss)
    return losses
