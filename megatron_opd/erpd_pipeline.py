"""ERPD end to end (`megatron-opd erpd --config <recipe>`): the two stages of Extreme Region Policy
Distillation on the same Megatron student, vLLM engine and refit as the OPD loop.

Per iteration (a fresh rollout batch; the previous iteration's stage-2 student is this one's pi_old):
    1. rollout     prompts x rollout.n samples of pi_old, verifier rewards, engine log-probs
    2. pi_old      log-probs, entropies and final hidden states of pi_old at the response positions
    3. stage 1     for each stage-1 loss (objective.erpd.stage1.loss + ensemble_with): from pi_old,
                   stage1_steps updates on the fixed batch; every candidate_every steps the weights are
                   kept as a candidate (host memory) and evaluated on the held-out prompts
    4. signal      S = lp_numerator - lp_denominator under the strategy's two weight sets, computed
                   once and stored with the batch (whitened, positive/negative part kept); the
                   candidates are then dropped, so no stage-1 model is in memory during distillation
    5. stage 2     pi_old restored, a fresh optimizer, stage2_steps PPO-clipped updates towards S with
                   KL-to-pi_old and entropy terms (signals summed, or one after the other)
    6. report      held-out accuracy and the exact reverse KL(pi_theta || pi_old) over the whole
                   vocabulary at the batch's response positions (vocab_kl.py), for every candidate and
                   for the stage-2 student

Every model here is one weight set loaded into the student's Megatron model in turn (`snapshot` /
`restore`): the layout, refit and evaluation are the trainer's own. Writes <out_dir>/erpd_results.json,
<out_dir>/erpd_table.md and metrics.jsonl rows per stage.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd import parallel, platform
from megatron_opd.batching import MicroBatch
from megatron_opd.config import OPDConfig


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters, copied to host memory."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


@torch.no_grad()
def restore(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        p.copy_(weights[n].to(p.device))


class ERPDPipeline:
    """The two stages around an `OPDTrainer` (setup, rollout, scoring, update, refit, evaluation)."""

    def __init__(self, cfg: OPDConfig):
        from megatron_opd.trainer import OPDTrainer

        if cfg.objective.name != "erpd":
            raise ValueError(f"objective.name={cfg.objective.name}: `megatron-opd erpd` runs objective.name=erpd")
        self.cfg = cfg
        self.erpd = cfg.objective.settings
        self.tr = OPDTrainer(cfg)
        self.updates = 0  # rows written to metrics.jsonl (its "step")

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        tr, erpd = self.tr, self.erpd
        tr.setup()
        try:
            self.pi_old_acc = self.evaluate().get("eval/accuracy")
            results = {"base_acc": self.pi_old_acc, "iterations": []}
            for it in range(erpd.iterations):
                results["iterations"].append(self.iteration(it))
                tr.step += 1  # the next batch: new prompts, new sampling seeds
            last = results["iterations"][-1]
            results.update({"erpd_stage1_acc": last["stage1_acc"], "erpd_stage2_acc": last["stage2_acc"],
                            "erpd_stage1_kl": last["stage1_kl"], "erpd_stage2_kl": last["stage2_kl"]})
            tr.save()
            if tr.rank0:
                self.write(results)
            return results
        finally:
            tr.cleanup()

    def iteration(self, it: int) -> dict:
        tr, erpd = self.tr, self.erpd
        batch, rollout_metrics = tr.rollout()
        tr.engines.release(tr.step)  # ERPD trains on this batch through its own stages
        pi_old = snapshot(tr.student.module)
        micro = self.score_pi_old(tr.micro_batches(batch))
        row = {"iteration": it + 1, "pi_old_acc": self.pi_old_acc,
               "rollout_acc": rollout_metrics["rollout/accuracy"], "teachers": []}
        signals = []  # one [b, s] tensor per micro-batch, per stage-1 teacher
        # strategy 3 trains no stage-1 teacher: its signal is pi_old over a weaker policy
        members = zip(erpd.stage1_losses, erpd.member_strategies) if erpd.stage2.strategy != 3 else ()
        for loss_name, strategy in members:
            restore(tr.student.module, pi_old)
            stage1 = dataclasses.replace(erpd.stage1, loss=loss_name) if loss_name != erpd.stage1.loss \
                else erpd.stage1
            candidates, curve = self.stage1(micro, stage1)
            teacher_step = erpd.teacher_step or erpd.stage1_steps
            teacher = next(c for c in curve if c["step"] == teacher_step)
            row["teachers"].append({"loss": loss_name, "curve": curve, "teacher_step": teacher_step,
                                    "acc": teacher["acc"], "kl": teacher["kl"]})
            signals.append(self.signal(micro, candidates, pi_old, strategy))
            del candidates
        if erpd.stage2.strategy == 3:
            signals.append(self.signal(micro, {}, pi_old, 3))
        restore(tr.student.module, pi_old)
        self.stage2(micro, signals)
        after = self.evaluate()
        kl = self.kl_to_pi_old(micro)
        best = max(row["teachers"], key=lambda t: t["acc"] or 0.0) if row["teachers"] else None
        row.update({"stage1_acc": best["acc"] if best else None, "stage1_kl": best["kl"] if best else None,
                    "stage2_acc": after.get("eval/accuracy"), "stage2_kl": kl})
        self.log({"erpd/iteration": it + 1, "erpd/stage2_acc": row["stage2_acc"], "erpd/stage2_kl": kl})
        self.pi_old_acc = row["stage2_acc"]  # the next batch's pi_old
        return row

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_pi_old(self, micro: list[MicroBatch]) -> list[MicroBatch]:
        """The micro-batches with pi_old's log-probs, entropies and final hidden states [n, H] (the
        exact-KL report)."""
        from megatron_opd.models.forward import lm_head_weight

        outs = self.tr.run_logprobs(self.tr.student, micro, entropy=True, hidden=True)
        if outs:  # the last pipeline stage holds the LM head
            self.old_lm_head = lm_head_weight(self.tr.student).detach().clone()
        return [replace(mb, old_logprobs=out["logprobs"], old_entropy=out["entropy"], old_hidden=out["hidden"])
                for mb, out in zip(micro, outs)] or micro

    def stage1(self, micro: list[MicroBatch], stage1_cfg) -> tuple[dict, list[dict]]:
        """stage1_steps updates from pi_old on the fixed batch; returns the kept candidates (weights by
        step) and their held-out accuracy / KL to pi_old."""
        from megatron_opd.loss import ERPDStage1Objective

        erpd = self.erpd
        micro = self.begin_stage(ERPDStage1Objective(stage1_cfg), erpd.stage1_lr, erpd.stage1_steps, micro)
        candidates, curve = {}, []
        for step in range(1, erpd.stage1_steps + 1):
            metrics = self.tr.update(mini_batch(micro, step))
            self.log({f"erpd/stage1_{k}": v for k, v in metrics.items()})
            if step % erpd.candidate_every == 0 or step == erpd.stage1_steps:
                candidates[step] = snapshot(self.tr.student.module)
                acc = self.evaluate().get("eval/accuracy")
                kl = self.kl_to_pi_old(micro)
                curve.append({"step": step, "acc": acc, "kl": kl})
                self.log({"erpd/stage1_candidate_step": step, "erpd/stage1_acc": acc, "erpd/stage1_kl": kl})
        return candidates, curve

    @torch.no_grad()
    def signal(self, micro: list[MicroBatch], candidates: dict, pi_old: dict, strategy: int) -> list[torch.Tensor]:
        """S = lp_numerator - lp_denominator per micro-batch (strategy 1: teacher over pi_old; 2: teacher
        over its early candidate; 3: pi_old over objective.erpd.weak_checkpoint)."""
        from megatron_opd.objectives.erpd import strategy_signal

        erpd, student = self.erpd, self.tr.student.module
        teacher_step = erpd.teacher_step or erpd.stage1_steps
        roles = {}
        if strategy in (1, 2):
            roles["teacher"] = self.logprobs_under(candidates[teacher_step], micro)
        if strategy == 2:
            roles["unlearned"] = self.logprobs_under(candidates[erpd.unlearned_step], micro)
        if strategy == 3:
            from megatron_opd.models.hf_mapping import HFCheckpoint, load_hf_into_megatron

            load_hf_into_megatron(student, self.tr.spec, HFCheckpoint(erpd.weak_checkpoint))
            roles["weak"] = self.logprobs_under(None, micro)
        restore(student, pi_old)
        if not micro or micro[0].old_logprobs is None:
            return []  # not the last pipeline stage: the forwards above ran, the log-probs live there
        return [strategy_signal(strategy, mb.old_logprobs, **{k: v[i] for k, v in roles.items()})
                for i, mb in enumerate(micro)]

    def logprobs_under(self, weights: Optional[dict], micro: list[MicroBatch]) -> list[torch.Tensor]:
        if weights is not None:
            restore(self.tr.student.module, weights)
        return [out["logprobs"] for out in self.tr.run_logprobs(self.tr.student, micro)]

    def stage2(self, micro: list[MicroBatch], signals: list[list[torch.Tensor]]) -> None:
        """Distil the stored signals into pi_old (restored by the caller) under the trust region."""
        from megatron_opd.loss import ERPDStage2Objective
        from megatron_opd.objectives.erpd import stage2_signals

        erpd = self.erpd
        masks = [mb.mask for mb in micro]
        positives = [mb.outcome_rewards > 0 for mb in micro]
        # not the last pipeline stage: no signals here
        prepared = [stage2_signals(per_mb, masks, positives, erpd.stage2.keep, erpd.whiten, parallel.dp_group())
                    for per_mb in signals if per_mb]
        if len(prepared) > 1 and (erpd.ensemble or "sum") == "sum":
            prepared = [[sum(parts) for parts in zip(*prepared)]]  # simultaneous ensemble
        rounds = len(signals) if erpd.ensemble == "sequential" else 1
        for r in range(rounds):  # one signal, the summed ensemble, or a sequential ensemble's parts
            with_signal = [replace(mb, signal=s) for mb, s in zip(micro, prepared[r])] if prepared else micro
            with_signal = self.begin_stage(ERPDStage2Objective(erpd.stage2), erpd.stage2_lr, erpd.stage2_steps,
                                           with_signal)
            for step in range(1, erpd.stage2_steps + 1):
                metrics = self.tr.update(mini_batch(with_signal, step))
                self.log({f"erpd/stage2_{k}": v for k, v in metrics.items()})

    # ------------------------------------------------------------------------------------------
    def begin_stage(self, objective, lr: float, steps: int, micro: list[MicroBatch]) -> list[MicroBatch]:
        """A fresh optimizer (constant lr) and `objective` for the next stage; returns the micro-batches
        as its preparation completes them."""
        from megatron_opd.models.student import OptimConfig, build_optimizer

        tr = self.tr
        optim = dataclasses.replace(self.cfg.optim, lr=lr, min_lr=lr, lr_warmup_steps=0,
                                    lr_decay_style="constant")
        tr.optimizer, tr.scheduler = build_optimizer(tr.student, optim, steps)
        tr.objective = objective
        return objective.prepare(micro, tr.step, parallel.dp_group())[0]

    @torch.no_grad()
    def kl_to_pi_old(self, micro: list[MicroBatch]) -> Optional[float]:
        """Exact reverse KL(pi_theta || pi_old), summed over the vocabulary, averaged over the batch's
        response tokens (over all data-parallel replicas); None off the last pipeline stage."""
        from megatron_opd.models.forward import lm_head_weight
        from megatron_opd.vocab_kl import vocab_parallel_kl

        tr = self.tr
        outs = tr.run_logprobs(tr.student, micro, hidden=True)
        total = torch.zeros(2, dtype=torch.float64)
        for mb, out in zip(micro, outs):
            kl = vocab_parallel_kl(out["hidden"], lm_head_weight(tr.student).detach(), mb.old_hidden,
                                   self.old_lm_head, parallel.tp_group(), tr.spec.vocab_size)
            total += torch.tensor([kl.double().sum().item(), kl.numel()], dtype=torch.float64)
        group = parallel.dp_group()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            total = total.to(platform.collective_device(group))
            dist.all_reduce(total, group=group)
        from megatron_opd.trainer import broadcast_metrics_from_last_stage

        value = float(total[0] / total[1]) if outs and total[1] > 0 else None
        return broadcast_metrics_from_last_stage({"kl": value})["kl"]

    def evaluate(self) -> dict:
        """Held-out avg@k of the student's current weights (refit into the engines first)."""
        self.tr.refit(version=self.tr.step)
        return self.tr.evaluate()

    def log(self, metrics: dict) -> None:
        self.updates += 1
        if self.tr.rank0:
            self.tr.metrics.log(self.updates, {k: v for k, v in metrics.items() if v is not None})

    def write(self, results: dict) -> None:
        out = Path(self.cfg.train.out_dir)
        (out / "erpd_results.json").write_text(json.dumps(results, indent=2))
        (out / "erpd_table.md").write_text(results_table(results))


def mini_batch(micro: list[MicroBatch], step: int) -> list[MicroBatch]:
    """The micro-batches of the mini-batch that optimizer step `step` (from 1) trains on: the batch's
    train.mini_batches mini-batches in turn, so a stage of M steps is one epoch."""
    minis = sorted({mb.mini for mb in micro})
    return [mb for mb in micro if mb.mini == minis[(step - 1) % len(minis)]]


def results_table(results: dict) -> str:
    """The paper's Table 2 shape: one row per iteration, held-out accuracy and KL(pi_theta || pi_old)."""
    lines = ["| iteration | pi_old acc | stage-1 teacher(s): acc / KL | stage-2 student: acc / KL |",
             "|---|---|---|---|"]
    prev = results.get("base_acc")
    for row in results["iterations"]:
        teachers = ", ".join(f"{t['loss']} {_f(t['acc'])} / {_f(t['kl'])}" for t in row["teachers"]) or "—"
        lines.append(f"| {row['iteration']} | {_f(prev)} | {teachers} | {_f(row['stage2_acc'])} / "
                     f"{_f(row['stage2_kl'])} |")
        prev = row["stage2_acc"]
    return "\n".join(lines) + "\n"


def _f(x) -> str:
    return "—" if x is None else f"{x:.3f}"
