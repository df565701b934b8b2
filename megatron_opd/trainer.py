"""The on-policy distillation loop, top to bottom.

Each step:
    1. rollout     the student's current weights in vLLM sample responses to a batch of prompts
    2. score       teacher(s) [and reference, only when lam != 1] give log p(sampled token), vocab-parallel
    3. update      the objective (loss.Objective: G-OPD/ExOPD, REOPOLD, GRPO) turns the scores into a
                   loss; Megatron forward/backward over micro-batches; optimizer step (several
                   mini-batches optional). The loop provides what the objective's `needs` ask for and
                   never looks at its name.
    4. refit       the new student weights stream into the live vLLM engine
    5. evaluate / checkpoint / log

All trainer ranks run this file. The engines are behind one rollout object (`self.engines`): colocated
(rollout/colocated.py; by default every rank's device hosts an engine shard, rollout.tensor_parallel_size
ranks per engine, a replica's share of the step's prompts is spread over its engines and the samples
reach every rank of the replica; the refit streams each replica's weights into its engines) or dedicated
(rollout/dedicated.py; engine-only ranks at the end of the job). A batch is asked for (`submit`) and
received (`collect`) separately: with train.max_staleness=1 step k+1's batch is asked for right after
step k's is received, so the dedicated engines generate it while step k scores and updates; the
objective's importance weights correct for the one step of staleness. Batches generated ahead of their
update are part of every checkpoint (`in_flight`), so a resumed run trains on the same samples.
The student, teacher(s) and reference share one TP/PP/EP layout, so the teacher's per-token log-probs
land on exactly the ranks (the last pipeline stage) where the student's loss needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_opd import checks, parallel, platform
from megatron_opd.batching import ForwardBatch, MicroBatch, with_global_counts
from megatron_opd.checkpoint import rng_state, set_rng_state
from megatron_opd.config import LAYOUT_CHANGES, OPDConfig, config_changes, config_to_dict
from megatron_opd.faults import maybe_fail
from megatron_opd.signals import PREEMPTED_MARKER


@dataclass
class StepBatch:
    """One rollout batch as trainer tensors (identical on every rank before the DP split)."""

    input_ids: torch.Tensor  # [B, S] prompt + response, right-padded
    response_mask: torch.Tensor  # [B, S-1] 1 where position t predicts a response token t+1
    rollout_logprobs: torch.Tensor  # [B, S-1] vLLM's log p of token t+1 (0 outside the mask)
    teacher_index: torch.Tensor  # [B] which teacher scores each sample (multi-teacher routing)
    rewards: torch.Tensor  # [B] outcome reward of each response (verifier)
    groups: torch.Tensor  # [B] which prompt of the replica's share each sample answers
    response_lengths: torch.Tensor  # [B]
    seq_lengths: torch.Tensor  # [B] prompt + response tokens of each row
    teacher_views: tuple = ()  # per teacher, [B] cross_tokenizer.TeacherView (tokenizer: cross) or None


class StepAbandoned(Exception):
    """A preemption arrived before the step's update: the step's rollout and scores are discarded."""


class OPDTrainer:
    """Setup / train / cleanup around one readable `train_step`."""

    def __init__(self, cfg: OPDConfig):
        self.cfg = cfg
        self.step = 0
        self.skipped_steps = 0
        self.engines = None
        """The rollout side (rollout/colocated.py): every engine call of the loop goes through it."""
        self.metrics = None
        self.preempt = None
        self.preempted = False
        """Set when a preemption signal ended the run (its last state is checkpointed): the CLI then
        exits with signals.PREEMPTED_EXIT_CODE."""
        self.rank0 = True
        self.phases: list[str] = []
        """What the current step did, in order (rollout, sleep, onload:ROLE, score, ...): read by tests
        and by anyone debugging the colocated memory choreography."""

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Set up a run, step by step; everything checkable without compute is checked first."""
        from megatron_opd.builders import build_cross_tokenizers, build_models, build_rollout, check_run, resolve_models
        from megatron_opd.checkpoint import start_writer_helpers
        from megatron_opd.models.student import build_optimizer
        from megatron_opd.rollout.dedicated import claim_cores
        from megatron_opd.signals import PreemptionFlag

        cfg = self.cfg
        models = resolve_models(cfg)  # checkpoints and specs of every role
        layout, ckpt = check_run(cfg, models)  # before any process group or weight exists
        claim_cores(cfg)  # dedicated engine ranks compute beside this rank: keep to its own cores (CPU)
        self.spec, self.student_dir, self.has_moe = models.spec, models.student.path, models.has_moe
        self.teacher_vocab = [s.vocab_size for s in models.teacher_specs]  # a cross teacher's is its own
        self.data = build_data(cfg, models.student.path)  # bad data paths/fields fail here, cheaply
        self.cross = build_cross_tokenizers(cfg, models, cfg.data.system_prompt)  # per teacher, or None
        self._init_parallel(layout)
        self.preempt = PreemptionFlag().install()
        start_writer_helpers()  # before any signal can arrive (see checkpoint.start_writer_helpers)
        self.student, self.teachers, self.reference = build_models(cfg, models, self.objective.needs)
        self.optimizer, self.scheduler = build_optimizer(self.student, cfg.optim, cfg.train.steps,
                                                         updates_per_step=cfg.train.mini_batches)
        resumed = self._resume(ckpt)
        self._open_run_dir(resumed)
        self.engines = build_rollout(cfg, models, self.data.verify, self.objective.needs)
        if resumed:  # the engines start from the HF checkpoint; they must serve the restored weights
            from megatron_opd.rollout.dedicated import load_in_flight

            self.refit(version=self.step)
            self.engines.restore(load_in_flight(ckpt))

    def _init_parallel(self, layout) -> None:
        """Process groups, then what depends on them: the objective and the log-prob path."""
        from megatron_opd.loss import build_objective
        from megatron_opd.models.forward import resolve_logprob_impl, uses_fp8_lm_head

        cfg = self.cfg
        parallel.initialize(cfg.parallel, seed=cfg.train.seed, world_size=layout.world)
        self.rank0 = parallel.is_rank0()
        self.experts_span_replicas = experts_span_replicas(cfg, self.has_moe, layout.dp)
        if self.experts_span_replicas and cfg.train.max_tokens_per_micro_batch is not None:
            raise ValueError(
                "train.max_tokens_per_micro_batch: the MoE layers' expert groups (ETP x EP = "
                f"{cfg.parallel.etp * cfg.parallel.expert_model_parallel_size} ranks) span data-parallel "
                "replicas, which must then feed micro-batches of one shape; set it to null (fixed "
                "train.micro_batch_size rows) or use ETP x EP <= TP")
        check_cross_layout(cfg, self.experts_span_replicas)
        self.objective = build_objective(cfg.objective, tp_group=parallel.tp_group(),
                                         vocab_size=self.spec.vocab_size)
        self.logprob_impl = resolve_logprob_impl(
            cfg.train.logprob_impl, self.spec.vocab_size // cfg.parallel.tensor_model_parallel_size)
        # the exact KL runs the LM heads itself; ERPD compares models' log-probs with pi_old's, which come
        # with its hidden states from the fused path: one path for all (the config refuses logits for both)
        if self.objective.needs.teacher_hidden or self.objective.needs.fused_logprobs:
            self.logprob_impl = "fused"
        self.lm_head_fp8 = uses_fp8_lm_head(cfg.precision.fp8, self.logprob_impl)
        """precision.fp8 on the fused LM head of every model's sampled-token log-probs (GPU, TE)."""
        self.teacher_sequences = 0
        """Sequences pushed through teacher forwards in the current step (routing: each sample once)."""

    def _resume(self, ckpt: Optional[Path]) -> bool:
        """Restore the newest checkpoint (student, optimizer, scheduler, data order), or set an earlier
        run's checkpoints aside for a fresh one. Returns whether the run resumed."""
        from megatron_opd.checkpoint import load_checkpoint, set_aside_earlier_run

        out = Path(self.cfg.train.out_dir)
        if ckpt is None:  # a fresh run: whatever an earlier run left here is kept, numbered, untouched
            aside = set_aside_earlier_run(out)
            if aside is not None:
                print(f"a fresh run in {out}: the earlier run's outputs (checkpoints, metrics, config, "
                      f"TensorBoard) were moved to {aside}", flush=True)
            if dist.is_initialized():
                dist.barrier()  # every rank sees the emptied directory before anything is written
            return False
        meta = load_checkpoint(ckpt, self.student, self.optimizer, self.scheduler)
        self.step = meta["step"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.data.train.load_state_dict(meta["data"])
        if self.rank0:
            print(f"resuming from {ckpt} (step {self.step} of {self.cfg.train.steps})", flush=True)
        return True

    def _open_run_dir(self, resumed: bool) -> None:
        """Metrics (the steps up to the checkpoint are kept on resume; a fresh run starts a new file),
        and on rank 0 the run's config.yaml."""
        from megatron_opd.metrics import MetricsLogger

        out = Path(self.cfg.train.out_dir)
        self.metrics = MetricsLogger(out, enabled=self.rank0, resume_step=self.step if resumed else -1,
                                     wandb=self.cfg.metrics.wandb, run_config=config_to_dict(self.cfg))
        if self.rank0:
            out.mkdir(parents=True, exist_ok=True)
            (out / PREEMPTED_MARKER).unlink(missing_ok=True)  # this run has not been preempted (yet)
            import yaml

            (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not self.rank0, desc="opd")
        final_eval = None
        if self.step == 0:
            initial = self.evaluate()  # collective over the replicas' engines
            if self.rank0:
                self.metrics.log(0, initial)
        while self.step < cfg.train.steps:
            start = {"data": self.data.train.state_dict(), "rng": rng_state()}
            try:
                metrics = self.train_step()
            except StepAbandoned:
                # Preempted before the update: nothing of this step is kept. The checkpoint holds the
                # state the step started from (with this step's batch if it was generated ahead), so the
                # resumed run draws and samples it again exactly.
                self.engines.discard_after(self.step)
                self.data.train.load_state_dict(start["data"])
                set_rng_state(start["rng"])
                self._save_preempted()
                break
            self.step += 1
            if not self.preempted and (cfg.train.eval_every and self.step % cfg.train.eval_every == 0
                                       or self.step == cfg.train.steps):
                final_eval = self.evaluate()
                metrics.update(final_eval)
            if self.rank0:
                self.metrics.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.3f}" for k in ("loss", "reward/mean", "eval/accuracy")
                                 if k in metrics and metrics[k] is not None})
            maybe_fail("step_logged")
            # A preemption during the refit (self.preempted, agreed in train_step) ends the run after
            # this step's save; one that arrived since is agreed here.
            if self.preempted or self._preemption_requested():
                self._save_preempted()
                break
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 or self.step == cfg.train.steps:
                self.save()
        bar.close()
        return final_eval or {}

    def train_step(self) -> dict:
        """One colocated step: rollout -> sleep -> score -> update -> wake -> refit. The engine's
        memory is released while the models compute (`RolloutEngine.sleep`; vLLM sleep mode on GPU, a
        tracked no-op on CPU), and its weights are woken before the refit, its KV cache after it.

        Preemption (SIGTERM / SIGUSR1 on any rank) is agreed between phases: before the update the step
        is abandoned (StepAbandoned); after it the step is kept and the refit skipped (`self.preempted`),
        so a signal is acted on within one phase, not one step."""
        self.phases = []
        timings = {}
        t0 = time.perf_counter()

        # 1. rollout: each replica's engine -> that replica's ranks
        with self.phase("rollout", timings):
            batch, rollout_metrics = self.rollout()
        self._abandon_if_preempted()
        if self.cfg.train.max_staleness and self.step + 1 < self.cfg.train.steps:
            with self.phase("submit_next", timings):  # generated while this step scores and updates
                self.engines.submit(self.data.train.next_batch(self.cfg.train.prompts_per_step), self.step + 1)
        with self.phase("sleep", timings):
            self.engines.sleep()

        # 2. micro-batches on the device; score with the frozen models
        # (the objectives' input checks are read once per phase: checks.deferred)
        with self.phase("score", timings):
            micro = self.micro_batches(batch)
            with checks.deferred():
                micro, prepare_metrics = self.score(micro)
        self._abandon_if_preempted()

        # 3. update: one optimizer step per mini-batch
        with self.phase("update", timings), checks.deferred():
            update_metrics = self.update(micro)

        # 4. wake the engine's weights, refit them, then wake its KV cache for the next rollout
        refit_stats = {}
        self.preempted = self._preemption_requested()  # the step is kept; the engine is not needed again
        if not self.preempted:
            with self.phase("wake", timings):
                self.engines.wake(["weights"])
            with self.phase("refit", timings):
                refit_stats = self.refit(version=self.step + 1)
                self.engines.wake(["kv_cache"])
            self.engines.wake_sampler()
        self.engines.release(self.step)

        timings["time/step"] = time.perf_counter() - t0
        tokens = int(batch.response_mask.sum().item())
        return {
            **rollout_metrics, **prepare_metrics, **update_metrics, **timings, **refit_stats, **platform.memory_stats(),
            "throughput/tokens_per_s": tokens / max(timings["time/step"], 1e-9),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_steps": self.skipped_steps,
            "score/teacher_sequences": float(self.teacher_sequences),
        }

    # ------------------------------------------------------------------------------------------
    # 1. rollout
    # ------------------------------------------------------------------------------------------
    def rollout(self) -> tuple[StepBatch, dict]:
        """This replica's share of the step's prompts, generated by the replica's engines and
        gathered on the replica's ranks; rollout metrics over all replicas."""
        cfg = self.cfg
        if not self.engines.has(self.step):  # not asked for during the previous step
            self.engines.submit(self.data.train.next_batch(cfg.train.prompts_per_step), self.step)  # same everywhere
        out = self.engines.collect(self.step)
        batch, cross_metrics = make_step_batch(out.batch, out.prompts, out.rewards, self.data.teacher_domains,
                                               pad_id=self.data.pad_id, max_len=cfg.rollout.max_model_len,
                                               length=self._common_length(out.batch), cross=self.cross)
        return batch, {**rollout_metrics(out.batch, out.rewards), **cross_metrics,
                       "rollout/staleness": float(self.step - out.version)}

    def _common_length(self, result) -> Optional[int]:
        """When the MoE layers' expert groups span data-parallel replicas (`experts_span_replicas`),
        every replica must feed micro-batches of one shape: all pad to the step's longest sequence."""
        from megatron.core import parallel_state as ps

        if not self.experts_span_replicas:
            return None
        longest = torch.tensor([result.max_length()], device=platform.collective_device())
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return int(longest.item())

    # ------------------------------------------------------------------------------------------
    # 2. micro-batches and scoring
    # ------------------------------------------------------------------------------------------
    def micro_batches(self, batch: StepBatch) -> list[MicroBatch]:
        """This replica's rollout batch cut into micro-batches (`batching.plan_micro_batches`: fixed
        rows, or a token budget), each padded only to its own longest sequence and tagged with its
        mini-batch, with the update's global token/sequence counts (over all its micro-batches and the
        data-parallel replicas)."""
        from megatron_opd.batching import plan_micro_batches

        train = self.cfg.train
        lengths = batch.seq_lengths.tolist()
        plan = plan_micro_batches(lengths, train.mini_batches, train.micro_batch_size,
                                  train.max_tokens_per_micro_batch)
        micro = []
        for m, mini in enumerate(plan):
            for rows in mini:
                idx = torch.tensor(rows)
                # Expert groups spanning replicas need one shape everywhere: keep the common length.
                width = batch.input_ids.shape[1] if self.experts_span_replicas else max(lengths[r] for r in rows)
                mask = batch.response_mask[idx, :width - 1]
                teacher_index = batch.teacher_index[idx]
                # sizes known here, on the host, so the device never has to be asked for them
                # (forward.response_positions): response tokens, and each teacher's rows
                teacher_rows = tuple((teacher_index == k).nonzero().squeeze(1) for k in range(len(self.teachers)))
                views = ()
                if any(self.cross):  # each cross-tokenizer teacher's forward batch of the rows it scores
                    # (the rows routed to it: check_cross_layout refuses every-teacher-scores-every-row)
                    views = tuple(None if c is None or not len(teacher_rows[k]) else
                                  self._cross_rows(batch, k, idx[teacher_rows[k]], width)
                                  for k, c in enumerate(self.cross))
                positions = ()
                if len(self.teachers) > 1:  # each teacher's response positions among the micro-batch's n
                    position_teacher = teacher_index[mask.nonzero()[:, 0]]  # [n]
                    positions = tuple((position_teacher == k).nonzero().squeeze(1) for k in range(len(self.teachers)))
                micro.append(MicroBatch(
                    input_ids=batch.input_ids[idx, :width], mask=mask, response_tokens=int(mask.sum()),
                    rollout_logprobs=batch.rollout_logprobs[idx, :width - 1], teacher_index=teacher_index,
                    outcome_rewards=batch.rewards[idx], group=batch.groups[idx], mini=m,
                    teacher_rows=teacher_rows, teacher_tokens=tuple(int(mask[r].sum()) for r in teacher_rows),
                    teacher_positions=positions, teacher_views=views))
        # Global counts over each update's micro-batches and the DP ranks: losses normalise by these, so
        # summing micro-batch losses and DP gradients gives exactly the full-batch objective.
        micro = [platform.to_device(mb) for mb in micro]  # the one host -> device move of the step's data
        return with_global_counts(micro, parallel.dp_group())

    def _cross_rows(self, batch: StepBatch, k: int, rows: torch.Tensor, width: int):
        """Teacher k's CrossBatch of some rows of the step batch (host), aligned with student width `width`."""
        from megatron_opd.cross_tokenizer import cross_batch

        rows = rows.tolist()
        prompts = (batch.seq_lengths[rows] - batch.response_lengths[rows]).tolist()
        return cross_batch([batch.teacher_views[k][r] for r in rows], prompts, width, self.data.pad_id,
                           student_logprobs=batch.rollout_logprobs[rows, :width - 1])

    @torch.no_grad()
    def score(self, micro: list[MicroBatch]) -> tuple[list[MicroBatch], dict]:
        """The micro-batches completed with what the objective needs (last PP stage): teacher log-probs
        (or hidden states for the exact KL), reference log-probs, pi_old log-probs and entropies; then
        the objective's batch-level preparation. Returns them and the preparation's metrics.

        With several teachers each scores only the samples routed to it (its rows of every
        micro-batch), so K teachers cost one teacher's compute, not K. Where expert groups span
        replicas (every replica must run the same forwards) each teacher scores every sample and the
        routed one is selected."""
        needs = self.objective.needs
        self.teacher_sequences = 0
        routed = len(self.teachers) > 1 and not self.experts_span_replicas
        for k, teacher in enumerate(self.teachers):
            cross = self.cross[k] is not None  # its own tokens (micro_batches built them for its rows)
            if routed:  # each micro-batch's rows of teacher k, known on the host (micro_batches)
                parts = [(i, mb.teacher_rows[k], mb.teacher_tokens[k]) for i, mb in enumerate(micro)]
                parts = [(i, rows, n) for i, rows, n in parts if len(rows)]
                inputs = [micro[i].teacher_views[k] if cross else
                          ForwardBatch(input_ids=micro[i].input_ids[rows], mask=micro[i].mask[rows], response_tokens=n)
                          for i, rows, n in parts]
            else:
                inputs = [mb.teacher_views[k] for mb in micro] if cross else micro
            self.teacher_sequences += sum(int(mb.input_ids.shape[0]) for mb in inputs)
            with self.on_device(f"teachers[{k}]", teacher, self.cfg.teachers[k].offload):
                # the exact KL needs only the teacher's hidden states: its LM head runs in the update's
                # one pass over both heads (which also gives the teacher's sampled-token log-probs)
                outs = self.run_logprobs(teacher, inputs, hidden=needs.teacher_hidden,
                                         logprobs=not needs.teacher_hidden, vocab_size=self.teacher_vocab[k])
                if needs.teacher_hidden and outs:  # last stage; a copy: an offloaded teacher's weights move
                    from megatron_opd.models.forward import lm_head_weight

                    teacher_lm_head = lm_head_weight(teacher).detach().clone()
            if cross:  # [b, S_T-1] its own tokens -> [b, s-1] each student token's share of its span
                outs = [{**out, "logprobs": view.to_student(out["logprobs"])} for view, out in zip(inputs, outs)]
            for i, out in enumerate(outs):  # last pipeline stage only
                if needs.teacher_hidden:  # [n_k, H_k] at the response positions of teacher k's rows
                    j, hidden = (parts[i][0], out["hidden"]) if routed else (i, out["hidden"])
                    if len(self.teachers) > 1 and not routed:  # scored every sample: keep its own
                        hidden = hidden.index_select(0, micro[j].teacher_positions[k])
                    held = list(micro[j].teacher_hidden) or [None] * len(self.teachers)
                    heads = list(micro[j].teacher_lm_head) or [None] * len(self.teachers)
                    held[k], heads[k] = hidden, teacher_lm_head
                    micro[j] = replace(micro[j], teacher_hidden=tuple(held), teacher_lm_head=tuple(heads))
                elif routed:
                    j, rows, _ = parts[i]
                    lp = micro[j].teacher_logprobs
                    lp = torch.zeros_like(micro[j].mask, dtype=torch.float32) if lp is None else lp
                    micro[j] = replace(micro[j], teacher_logprobs=lp.index_copy(0, rows, out["logprobs"]))
                else:
                    lp = out["logprobs"]
                    micro[i] = replace(micro[i], teacher_logprobs=lp if k == 0 else torch.where(
                        (micro[i].teacher_index == k)[:, None], lp, micro[i].teacher_logprobs))
        if self.reference is not None:
            with self.on_device("reference", self.reference, self.cfg.reference.offload):
                outs = self.run_logprobs(self.reference, micro)
            micro = [replace(mb, reference_logprobs=out["logprobs"]) for mb, out in zip(micro, outs)] or micro
        # pi_old: needed when one rollout batch feeds several updates, and for a batch-level selection
        # (which must be known for the whole batch before the first update). Otherwise the update's
        # own forward pass provides it (detached), saving a full forward.
        if self.cfg.train.mini_batches > 1 or needs.old_policy:
            outs = self.run_logprobs(self.student, micro, entropy=True)
            micro = [replace(mb, old_logprobs=out["logprobs"], old_entropy=out["entropy"])
                     for mb, out in zip(micro, outs)] or micro
        return self.objective.prepare(micro, self.step, parallel.dp_group())

    def run_logprobs(self, model, micro: list[ForwardBatch], entropy: bool = False, hidden: bool = False,
                     logprobs: bool = True, vocab_size: Optional[int] = None) -> list[dict]:
        """Forward-only log-probs (and entropy, and the final hidden states [n, H] at the response
        positions; with logprobs=False only those, and the LM head does not run) of each micro-batch
        (last pipeline stage; [] elsewhere). `vocab_size`: the model's valid vocabulary (default the
        student's; a teacher with tokenizer: cross has its own)."""
        from megatron_opd.models import forward

        impl = "fused" if hidden else self.logprob_impl  # hidden states: the LM head runs here

        def fn(mb, out):  # out: [b, s, H] hidden states (fused) or [b, s, V/tp] logits
            result = {"hidden": forward.gather_response(out, mb)[0]} if hidden else {}
            if logprobs:
                lp, ent = forward.response_logprobs(
                    model, out, mb, impl, tp_group=parallel.tp_group(), valid_vocab_size=vocab_size or self.spec.vocab_size,
                    compute_entropy=entropy, fp8=self.lm_head_fp8 and impl == "fused")  # [b, s-1]
                result.update(logprobs=lp, entropy=ent)
            return out.new_zeros(()), result

        output = "hidden" if impl == "fused" else "logits"
        return forward.run_micro_batches(model, micro, fn, forward_only=True, output=output)

    def _output(self) -> str:
        return "hidden" if self.logprob_impl == "fused" else "logits"

    def _abandon_if_preempted(self) -> None:
        if self._preemption_requested():
            raise StepAbandoned(f"preempted during step {self.step + 1} before its update")

    @contextlib.contextmanager
    def phase(self, name: str, timings: Optional[dict] = None):
        """Record `name` in `self.phases` (and its duration as timings["time/NAME"])."""
        self.phases.append(name)
        maybe_fail(f"phase_{name}")  # fault-injection point (tests): kills and signals at every phase
        t = time.perf_counter()
        yield
        if timings is not None:
            timings[f"time/{name}"] = time.perf_counter() - t

    @contextlib.contextmanager
    def on_device(self, role: str, model, offload: bool):
        """A frozen model with `offload: true` lives in host memory except while it scores."""
        if not offload:
            yield
            return
        self.phases.append(f"onload:{role}")
        platform.onload(model)
        yield
        platform.offload(model)
        self.phases.append(f"offload:{role}")

    # ------------------------------------------------------------------------------------------
    # 3. update
    # ------------------------------------------------------------------------------------------
    def update(self, micro: list[MicroBatch]) -> dict:
        from megatron_opd.loss import StudentOutputs, objective_loss
        from megatron_opd.models import forward
        from megatron_opd.models.student import gather_updated_params, optimizer_state_bytes

        cfg = self.cfg
        needs = self.objective.needs
        all_metrics: list[dict] = []
        for m in sorted({mb.mini for mb in micro}):
            mini = [mb for mb in micro if mb.mini == m]  # its global counts are its own (micro_batches)

            def loss_fn(mb, out):
                if needs.teacher_hidden:  # the objective runs both LM heads in one pass (exact KL)
                    hidden, idx = forward.gather_response(out, mb)  # [n, H] at the response positions
                    target = mb.input_ids.reshape(-1).index_select(0, idx + 1)  # [n]
                    student = self.objective.student_outputs(mb, hidden, forward.lm_head_weight(self.student),
                                                             target)
                    lp, ent = student.logprobs, student.entropy  # [b, s-1]
                else:
                    lp, ent = forward.response_logprobs(
                        self.student, out, mb, self.logprob_impl, tp_group=parallel.tp_group(),
                        valid_vocab_size=self.spec.vocab_size, compute_entropy=needs.update_entropy,
                        fp8=self.lm_head_fp8,
                    )  # [b, s-1]
                    student = None
                # A diverged student (non-finite log-probs) is kept as a device flag, not read here:
                # the objective runs on zeroed log-probs (every rank reports the same metric keys for
                # reduce_metrics' all-reduce), its loss stays in the graph multiplied by 0, and the
                # step's one finiteness check (_all_finite) skips the update and counts it.
                nonfinite = ~torch.isfinite(lp).all()
                lp = torch.nan_to_num(lp, 0.0, 0.0, 0.0)
                ent = torch.nan_to_num(ent, 0.0, 0.0, 0.0) if ent is not None else None
                student = dataclasses.replace(student, logprobs=lp, entropy=ent) if student is not None \
                    else StudentOutputs(logprobs=lp, entropy=ent)
                loss, metrics = objective_loss(self.objective, mb, student, step=self.step)
                loss = torch.where(nonfinite, loss * 0.0, loss)
                return loss, {**metrics, "loss": loss.detach(), "nonfinite": nonfinite.float()}

            self.student.zero_grad_buffer()
            self.optimizer.zero_grad()
            outs = forward.run_micro_batches(self.student, mini, loss_fn, forward_only=False,
                                             output=self._output())
            metrics = reduce_metrics(outs, mini)
            if self._all_finite(metrics):
                ok, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(1)
                metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            else:
                if not cfg.train.skip_nonfinite:
                    raise FloatingPointError(
                        f"non-finite loss or gradients at step {self.step} (train.skip_nonfinite=false)")
                self.skipped_steps += 1
                self.student.zero_grad_buffer()
                metrics["grad_norm"] = float("nan")
            metrics["memory/optimizer_state_mib"] = optimizer_state_bytes(self.optimizer) / 2**20  # this rank's
            all_metrics.append(metrics)
        gather_updated_params(self.student)  # the refit and the checkpoint read them next
        out = {k: sum(m[k] for m in all_metrics) / len(all_metrics) for k in all_metrics[0]}
        return broadcast_metrics_from_last_stage(out)

    # ------------------------------------------------------------------------------------------
    # 4. refit, 5. evaluation / checkpoint
    # ------------------------------------------------------------------------------------------
    def refit(self, version: int) -> dict:
        """The student's weights, which have taken `version` optimizer steps, into the engines."""
        stats = self.engines.load_weights(self.student.module, self.spec, version=version)
        return {"refit/seconds": stats.seconds, "refit/gib": stats.bytes / 2**30}

    def evaluate(self) -> dict:
        """Held-out avg@k, the prompts spread over every engine (collective; the metrics are returned
        on global rank 0, {} elsewhere)."""
        return self.engines.evaluate(self.data, k=self.cfg.train.eval_samples)

    def save(self) -> None:
        """Checkpoint the student, optimizer, scheduler, data position and the batches generated ahead of
        their update (waiting for one still being generated)."""
        from functools import partial

        from megatron_opd.checkpoint import save_checkpoint
        from megatron_opd.rollout.dedicated import save_in_flight

        in_flight = self.engines.in_flight()  # collective
        save_checkpoint(
            Path(self.cfg.train.out_dir) / "checkpoints", self.step, self.student, self.optimizer,
            self.scheduler, extra={"data": self.data.train.state_dict(), "layout": parallel.current_layout(),
                                   "skipped_steps": self.skipped_steps, "config": config_to_dict(self.cfg)},
            keep_last=self.cfg.train.keep_last, spec=self.spec, tokenizer_dir=self.student_dir,
            write_extra=partial(save_in_flight, rollouts=in_flight),
        )

    def _save_preempted(self) -> None:
        """Checkpoint, then leave <out_dir>/PREEMPTED_MARKER (the step) for whatever runs the job."""
        self.save()
        self.preempted = True
        if self.rank0:
            (Path(self.cfg.train.out_dir) / PREEMPTED_MARKER).write_text(f"{self.step}\n")

    def _all_finite(self, metrics: dict) -> bool:
        """Loss (last stage) and every gradient (all ranks) finite? One fused reduction over every
        gradient buffer, agreed across all ranks, read once."""
        buffers = list(self.student.buffers) + list(self.student.expert_parallel_buffers)
        finite = torch.stack([torch.isfinite(b.grad_data).all() for b in buffers]).all()
        bad = (~finite).float().reshape(1).to(platform.collective_device())
        bad = torch.maximum(bad, torch.full_like(bad, float(metrics.get("nonfinite", 0.0) != 0.0)))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    def _preemption_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.preempt.requested else 0.0], device=platform.collective_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # all ranks must agree to checkpoint
        return bool(flag.item())

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            if self.rank0:
                from megatron_opd.metrics import plot_run

                out = Path(self.cfg.train.out_dir)
                plot_run(out / "metrics.jsonl", out / "curves.png", title=out.name)
        if self.engines is not None:
            self.engines.shutdown()
        if self.preempt is not None:
            self.preempt.uninstall()
        parallel.destroy()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def check_cross_layout(cfg: OPDConfig, experts_span: bool) -> None:
    """Teachers with another tokenizer where the MoE layers' expert groups span data-parallel replicas
    (`experts_span_replicas`): every replica would have to feed teacher sequences of one length, and the
    re-tokenized rows differ in length between replicas. Refused (not supported)."""
    cross = [i for i, t in enumerate(cfg.teachers) if t.tokenizer == "cross"]
    if experts_span and cross:
        raise ValueError(
            f"teachers[{cross[0]}].tokenizer=cross: the MoE layers' expert groups (ETP x EP = "
            f"{cfg.parallel.etp * cfg.parallel.expert_model_parallel_size} ranks) span data-parallel replicas, "
            "which must then feed teacher sequences of one length, and a teacher's re-tokenized rows differ in "
            "length between replicas (not supported); use ETP x EP <= TP")


def check_vocabularies(student, teachers, reference, cfg: OPDConfig, roles: Optional[list] = None) -> None:
    """Token-level distillation compares log-probs of the *same* token ids: every model must share
    the student's vocabulary (teachers with tokenizer: cross are not passed here). Refused at start-up,
    before any process group or weight exists. `roles`: the teachers' names (default teachers[i])."""
    roles = list(zip(roles or [f"teachers[{i}]" for i in range(len(teachers))], teachers))
    if reference is not None:
        roles.append(("reference", reference))
    for role, spec in roles:
        if spec.vocab_size != student.vocab_size:
            raise ValueError(
                f"{role} ({spec.name}) has vocab_size={spec.vocab_size} but the student ({student.name}) "
                f"has {student.vocab_size}: token-level OPD needs one shared tokenizer/vocabulary. "
                "Use a teacher from the student's family (e.g. Qwen3 -> Qwen3), or set "
                f"{role}.tokenizer: cross for a teacher with its own tokenizer."
            )


def check_tokenizers(student_dir, others: list[tuple[str, object]]) -> None:
    """Token-level distillation scores the student's token ids with every model: each teacher's and
    the reference's tokenizer must map every token to the same id and use the same chat special
    tokens. Refused at start-up, naming the role and the first differing token."""
    from transformers import AutoTokenizer

    def identity(path):
        if not list(Path(path).glob("tokenizer*")):
            raise ValueError(f"{path} has no tokenizer files: every model directory must ship its "
                             "tokenizer so that megatron_opd can check it matches the student's")
        tok = AutoTokenizer.from_pretrained(str(path))
        special = {k: v for k, v in tok.special_tokens_map.items()}
        return tok.get_vocab(), special, getattr(tok, "chat_template", None)

    vocab, special, template = identity(student_dir)
    for role, path in others:
        if path is None or Path(path) == Path(student_dir):
            continue
        o_vocab, o_special, o_template = identity(path)
        if o_vocab != vocab:
            diff = sorted(set(vocab.items()) ^ set(o_vocab.items()), key=lambda kv: (kv[1], kv[0]))[0]
            token = diff[0]
            raise ValueError(
                f"{role} ({path}) has a different tokenizer from the student ({student_dir}): token "
                f"{token!r} is id {o_vocab.get(token)} there and {vocab.get(token)} in the student. "
                "Token-level OPD needs the student's exact vocabulary; use a teacher of the same family, "
                f"or set {role}.tokenizer: cross for a teacher with its own tokenizer.")
        if o_special != special:
            key = sorted(k for k in set(special) | set(o_special) if special.get(k) != o_special.get(k))[0]
            raise ValueError(
                f"{role} ({path}) has special token {key}={o_special.get(key)!r} but the student has "
                f"{special.get(key)!r}: the chat special tokens must match the student's")
        if o_template is not None and template is not None and o_template != template:
            raise ValueError(f"{role} ({path}) has a different chat template from the student; the "
                             "sampled responses are formatted by the student's")


def check_resumable(ckpt: Path, cfg: OPDConfig, dp: int) -> list[str]:
    """What changed since the checkpoint was written, as lines for the log. train.resume=true continues a
    run only with the config that wrote it, up to the run length, evaluation and logging
    (config.RESUMABLE_CHANGES) and the layout (config.LAYOUT_CHANGES and the data-parallel size `dp`: the
    checkpoint is resharded on load); train.resume=force accepts any change. Checked from meta.json,
    before compute."""
    from megatron_opd.checkpoint import read_meta

    meta = read_meta(ckpt)
    old = meta.get("config")
    if old is None:  # written before checkpoints recorded their config
        return []
    changes = config_changes(old, config_to_dict(cfg))
    layout = [c for c in changes if c.split(":")[0] in LAYOUT_CHANGES]
    old_dp = meta.get("layout", {}).get("dp")
    if old_dp is not None and old_dp != dp:
        layout.append(f"data-parallel size: {old_dp} -> {dp}")
    others = [c for c in changes if c not in layout]
    if others and cfg.train.resume != "force":
        shown = "; ".join(others[:5]) + (f"; and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(
            f"train.resume: {ckpt} was written with a different config ({shown}). Only the run length, "
            "evaluation, logging and the layout may change on resume. Set train.resume=force to continue "
            "with the new config, train.resume=false to start afresh (the earlier run moves to "
            "previous_runs/<N>/), or use another train.out_dir")
    if layout and old.get("optim", {}).get("use_distributed_optimizer"):
        # checkpoint.DISTRIBUTED_OPTIMIZER_FORMAT keeps each rank's flat buffer shards: fast to write, but
        # laid out for the layout that wrote them
        raise ValueError(
            f"train.resume: {ckpt} holds distributed-optimizer state sharded for the layout that wrote it, "
            f"which cannot be resumed at another ({'; '.join(layout)}); resume at the checkpoint's layout, "
            "or start afresh (train.resume=false)")
    lines = [f"resuming at a new layout ({'; '.join(layout)}): the checkpoint is resharded on load"] if layout else []
    if others:
        lines.append(f"train.resume=force: continuing with a changed config ({'; '.join(others)})")
    return lines


def experts_span_replicas(cfg: OPDConfig, has_moe: bool, dp: int) -> bool:
    """Whether the MoE layers' expert groups (ETP x EP ranks) are wider than a replica's TP group and
    so span data-parallel replicas: megatron-core's token dispatcher then all-gathers routing maps of
    equal size over them, so every replica must run the same forwards on micro-batches of one shape."""
    p = cfg.parallel
    return has_moe and p.etp * p.expert_model_parallel_size > p.tensor_model_parallel_size and dp > 1


def check_batch_split(cfg: OPDConfig, dp: int) -> None:
    """Every data-parallel replica serves an equal share of the step's prompts."""
    if cfg.train.prompts_per_step % dp:
        raise ValueError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} does not split over {dp} data-parallel "
            "replicas; use a multiple of the data-parallel size (world size / (TP x PP))")
    sequences = cfg.train.prompts_per_step // dp * cfg.rollout.n
    if cfg.train.max_tokens_per_micro_batch is not None:
        if sequences % cfg.train.mini_batches:
            raise ValueError(
                f"train.mini_batches={cfg.train.mini_batches} does not divide the {sequences} sequences of a "
                "replica (prompts_per_step / data-parallel size x rollout.n): every update must see an equal "
                "share; pick a divisor")
        return
    micro = math.ceil(sequences / cfg.train.micro_batch_size)
    if micro % cfg.train.mini_batches:
        raise ValueError(
            f"train.mini_batches={cfg.train.mini_batches} does not divide the {micro} micro-batches of a "
            f"replica ({sequences} sequences / train.micro_batch_size={cfg.train.micro_batch_size}); every "
            "update must see an equal share: pick a divisor, or change prompts_per_step / micro_batch_size")


def reduce_metrics(outs: list[dict], micro: list[MicroBatch]) -> dict:
    """Token-weighted mean of per-micro-batch metrics on the last stage, averaged over DP ranks.

    Each micro-batch's "loss" is already globally normalised, so losses are summed, not averaged.
    """
    from megatron.core import parallel_state as ps

    if not outs:
        return {}
    keys = sorted({k for o in outs for k in o})  # the same on every DP rank (see update's loss_fn)
    dp = ps.get_data_parallel_world_size()
    dev = micro[0].mask.device
    weights = torch.stack([mb.mask.sum() for mb in micro]).to(torch.float64)  # [micro]
    total = weights.sum().clamp(min=1.0)
    vals = []
    for k in keys:  # metric values stay on the device (tensors or host numbers), read once below
        v = torch.stack([torch.as_tensor(o.get(k, 0.0), dtype=torch.float64, device=dev).reshape(())
                         for o in outs])  # [micro]
        if k in ("loss",):
            vals.append(v.sum())
        elif k == "nonfinite" or k.endswith("max") or k.endswith("max_abs"):
            vals.append(v.max())
        else:
            vals.append((v * weights).sum() / total)
    t = torch.stack(vals)
    if dp > 1:
        t = t.to(platform.collective_device(ps.get_data_parallel_group()))
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        # the loss is a sum over DP ranks; everything else a mean
        # (max-type metrics are summed here too: acceptable for logging, documented as "mean over
        # DP of the per-rank max" would need a second collective)
        t = torch.where(torch.tensor([k == "loss" for k in keys], device=t.device), t, t / dp)
    return dict(zip(keys, t.tolist()))  # the one host read of the metrics


def broadcast_metrics_from_last_stage(metrics: dict) -> dict:
    """Metrics exist on the last pipeline stage; rank 0 (first stage) logs them."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    group = ps.get_pipeline_model_parallel_group()
    src = dist.get_process_group_ranks(group)[-1]
    box = [metrics]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def build_data(cfg: OPDConfig, tokenizer_dir):
    """Prompts, verifier and held-out evaluation of a run (same on every rank)."""
    from megatron_opd.data.bundle import DataBundle

    return DataBundle(cfg, tokenizer_dir)


def make_step_batch(result, samples, rewards, teacher_domains, pad_id, max_len,
                    length: Optional[int] = None, cross: Sequence = ()) -> tuple[StepBatch, dict]:
    """RolloutBatch -> StepBatch tensors (every rank of the replica), padded to `length` if given, and
    with teachers of another tokenizer (`cross`: per teacher a CrossTokenizer or None) each sample as
    that teacher sees it; student tokens without a span in their teacher's alignment leave the mask.
    Returns the batch and the cross-tokenizer metrics of this replica's samples."""
    t = result.to_padded(pad_id=pad_id, max_len=max_len, length=length)
    domains = [samples[s.prompt_index]["domain"] for s in result.samples]
    if len(teacher_domains) <= 1:  # one teacher, or none (an objective without teachers)
        index = torch.zeros(len(domains), dtype=torch.long)
    else:
        lookup = {d: i for i, d in enumerate(teacher_domains)}
        unknown = sorted(set(domains) - set(lookup))
        if unknown:
            raise ValueError(f"prompts with domain(s) {unknown} have no teacher; teachers[*].domain "
                             f"are {teacher_domains}")
        index = torch.tensor([lookup[d] for d in domains])
    views, metrics = (), {}
    if any(c is not None for c in cross):
        views, metrics = cross_views(result, samples, index, cross, t["response_mask"])
    return StepBatch(
        input_ids=t["input_ids"], response_mask=t["response_mask"],
        rollout_logprobs=t["rollout_logprobs"], teacher_index=index,
        rewards=torch.tensor(rewards, dtype=torch.float32), response_lengths=t["response_lengths"],
        seq_lengths=t["seq_lengths"], groups=torch.tensor([s.prompt_index for s in result.samples]),
        teacher_views=views,
    ), metrics


def cross_views(result, samples, index: torch.Tensor, cross: Sequence, response_mask: torch.Tensor):
    """Each sample as its own (routed) teacher sees it where that teacher has another tokenizer: per
    teacher a list over the samples (None for the samples routed elsewhere), or None for a teacher with
    the student's tokenizer; and the metrics. Masks out (in place) the student tokens without a span."""
    start = time.perf_counter()
    routed_to = index.tolist()
    views = tuple(None if c is None else [
        c.view(samples[s.prompt_index]["prompt"], s.response_ids, s.finish_reason == "stop")
        if routed_to[r] == k else None for r, s in enumerate(result.samples)] for k, c in enumerate(cross))
    elapsed = time.perf_counter() - start
    student = teacher = spans = unaligned = 0
    prompt_lengths = [len(s.prompt_ids) for s in result.samples]
    for r, k in enumerate(routed_to):
        if views[k] is None:
            continue
        v = views[k][r]
        for i, span in enumerate(v.student_span):
            if span < 0:
                response_mask[r, prompt_lengths[r] - 1 + i] = 0
        student += len(v.student_span)
        teacher += sum(1 for x in v.teacher_span if x >= 0)
        spans += v.n_spans
        unaligned += sum(1 for x in v.student_span if x < 0)
    metrics = {"cross/retokenize_s": elapsed,
               "cross/teacher_tokens_per_student_token": teacher / max(student - unaligned, 1),
               "cross/student_tokens_per_span": (student - unaligned) / max(spans, 1),
               "cross/unaligned_fraction": unaligned / max(student, 1)}
    return views, metrics


def rollout_metrics(result, rewards) -> dict:
    """Accuracy, lengths and truncation over every replica's samples (collective over DP)."""
    from megatron.core import parallel_state as ps

    local = [(float(r), s.length, s.finish_reason == "length") for r, s in zip(rewards, result.samples)]
    parts = [local]
    if ps.get_data_parallel_world_size() > 1:
        parts = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    rows = [row for p in parts for row in p]
    n = max(len(rows), 1)
    return {
        "rollout/accuracy": sum(r for r, _, _ in rows) / n,
        "rollout/response_length": sum(l for _, l, _ in rows) / n,
        "rollout/response_length_max": float(max((l for _, l, _ in rows), default=0)),
        "rollout/truncated_fraction": sum(t for _, _, t in rows) / n,
    }
