"""The rollout side of the loop: the trainer's one view of its vLLM engines.

`ColocatedRollout` runs the engines on the training ranks' own devices (rollout/placement.py: by
default one engine shard on every device). It owns everything about engines that the trainer used to
spread over itself — which rank owns which engine, how a replica's prompts are spread over its engines,
how samples reach the ranks whose loss needs them, held-out evaluation over every engine, sleep / wake
and the refit — behind a few calls: `submit` / `collect` / `release` (a step's batch), `evaluate`, `sleep`, `wake`,
`load_weights`, and `in_flight` / `restore` (batches generated ahead of their update, for checkpoints).
The dedicated-ranks placement (rollout/dedicated.py) is the second implementation of the same calls.

Every call is collective over all trainer ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_opd.rollout.engine import RolloutBatch
from megatron_opd.rollout.placement import EnginePlacement, engine_of_rank, engine_share, plan_engines


@dataclass
class StepSamples:
    """One replica's rollout of a step, identical on every rank of the replica."""

    prompts: list[dict]
    """The replica's share of the step's prompts (global indices [first_index, first_index + len))."""

    first_index: int
    batch: RolloutBatch
    """rollout.n samples per prompt, in prompt order (`prompt_index` relative to `prompts`)."""

    rewards: list[float]
    """The verifier's outcome reward of each sample."""

    version: int = 0
    """Optimizer steps the weights that generated it had taken (the step minus its staleness)."""


def build_engine(cfg, model_dir, placement: Optional[EnginePlacement] = None, world_size: int = 1,
                 in_process: Optional[bool] = None):
    """A vLLM engine serving `model_dir` on the placement's devices."""
    from megatron_opd.rollout.engine import RolloutEngine

    devices = placement.devices if placement is not None else (0,)
    return RolloutEngine(cfg.rollout, model_dir, seed=cfg.train.seed, system_prompt=cfg.data.system_prompt,
                         in_process=in_process, devices=devices, world_size=world_size)


def replica_share(n: int) -> tuple[int, int]:
    """[lo, hi) of n items served by this rank's data-parallel replica."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return r * n // dp, (r + 1) * n // dp


def local_world_size() -> Optional[int]:
    """Ranks per node under torchrun / SLURM (None: unknown, one node)."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else None


class ColocatedRollout:
    """Engines on the training ranks' devices (the `rollout.tensor_parallel_size` / engines_per_replica
    placement), generating for the loop and refit from the student after every step."""

    def __init__(self, cfg, model_dir, spec, verify: Callable, sampler_dir=None):
        """`verify(batch, prompts)` gives the outcome rewards of a RolloutBatch; `sampler_dir`: a second
        model whose engine samples the training batch instead of the student's (SFT on teacher samples:
        fixed weights, never refit)."""
        from megatron.core import parallel_state as ps

        self.cfg, self.spec, self.verify = cfg, spec, verify
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        p = cfg.parallel
        self.plan = plan_engines(self.world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                 cfg.rollout.tensor_parallel_size, gpus_per_node=local_world_size(),
                                 engines_per_replica=cfg.rollout.engines_per_replica)
        self.placement = engine_of_rank(self.plan, self.rank)
        self.replica = ps.get_data_parallel_rank()
        self.replica_engines = [e for e in self.plan if e.replica == self.replica]
        self.receivers = {e.owner for e in self.plan}
        self.group = ps.get_model_parallel_group()  # the replica's TP x PP ranks
        self.engine = self.sampler = None
        self.step = 0
        self.version = 0
        """Optimizer steps of the weights the engines hold."""
        self.submitted: dict[int, list[dict]] = {}
        """step -> prompts asked for and not yet generated (colocated engines generate in `collect`)."""
        self.restored: dict = {}
        """step -> rollout.dedicated.Rollout: a batch a checkpoint kept (a run resumed at this placement
        from a one-step-off run's checkpoint, train.resume=force) is trained on as it is."""
        if self.placement is not None:
            import signal

            from megatron_opd.signals import shielded_children

            # Its engine-core process must outlive SLURM's advance preemption signal (SIGUSR1); vLLM
            # itself stops that process with SIGTERM, so SIGTERM stays deliverable.
            with shielded_children((signal.SIGUSR1,)):
                self.engine = build_engine(cfg, model_dir, self.placement, self.world)
                if sampler_dir is not None:  # its own engine-core process: two in-process engines
                    self.sampler = build_engine(cfg, sampler_dir, self.placement, self.world, in_process=False)

    # ------------------------------------------------------------------------------------------
    @property
    def asleep(self) -> Optional[list[str]]:
        """The pools this rank's engine has released (None where the rank owns no engine)."""
        return sorted(self.engine.asleep) if self.engine is not None else None

    def submit(self, prompts: Sequence[dict], step: int) -> None:
        """Remember `step`'s prompts; the engines share the trainer's devices, so they generate when the
        loop asks for the batch (`collect`)."""
        self.submitted[step] = list(prompts)

    def has(self, step: int) -> bool:
        return step in self.submitted or step in self.restored

    def collect(self, step: int) -> StepSamples:
        """This replica's share of `step`'s batch, generated now (collective)."""
        if step in self.restored:
            rollout = self.restored[step]
            return rollout.part(*replica_share(len(rollout.prompts)))
        return self.generate(self.submitted[step], step)

    def release(self, step: int) -> None:
        self.submitted.pop(step, None)
        self.restored.pop(step, None)

    def discard_after(self, step: int) -> None:
        for s in [x for x in self.submitted if x > step]:
            del self.submitted[s]

    def in_flight(self) -> list:
        """Nothing is generated ahead of its update here; a batch abandoned before its update is
        generated again, identically (per-prompt seeds), when the run resumes."""
        return [self.restored[s] for s in sorted(self.restored)]

    def restore(self, rollouts: list) -> None:
        self.restored.update({r.step: r for r in rollouts})

    def generate(self, prompts: Sequence[dict], step: int) -> StepSamples:
        """This replica's share of the step's prompts (the same list on every rank), spread over the
        replica's engines by global index; each engine's owner samples and verifies its part, and every
        rank of the replica receives the whole share's samples in prompt order."""
        self.step = step
        lo, hi = replica_share(len(prompts))
        share = list(prompts[lo:hi])
        part = None
        if self.placement is not None:
            a, b = engine_share(lo, hi, len(self.replica_engines), self.placement.index)
            batch = self.sample(list(prompts[a:b]), first_index=a, step=step)
            rewards = self.verify(batch, list(prompts[a:b]))
            for s in batch.samples:  # indices relative to the replica's share
                s.prompt_index += a - lo
            part = (self.placement.index, batch, rewards)
        parts = self._gather_in_replica(part)
        batch, rewards = RolloutBatch(), []
        for _, b, r in sorted(parts, key=lambda x: x[0]):
            batch.samples += b.samples
            rewards += list(r)
        return StepSamples(prompts=share, first_index=lo, batch=batch, rewards=rewards, version=self.version)

    def sample(self, prompts: list[dict], first_index: int, step: int) -> RolloutBatch:
        """The owned engine's samples for these prompts. Per-prompt seeds depend on the global index
        and the step only, so the samples do not depend on the number or placement of engines."""
        from megatron_opd.rollout.dedicated import sampling_seed

        return (self.sampler or self.engine).generate(
            [s["prompt"] for s in prompts], n=self.cfg.rollout.n, seed=sampling_seed(self.cfg, step),
            first_index=first_index)

    def _gather_in_replica(self, part) -> list:
        """Every engine owner's part, on every rank of the replica."""
        if self.world == 1:
            return [part]
        parts = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, part, group=self.group)
        return [p for p in parts if p is not None]

    def evaluate(self, data, k: int) -> dict:
        """Held-out avg@k with the engines' current weights, the prompts spread over every engine of the
        job (metrics on global rank 0, {} elsewhere)."""
        from megatron_opd.rewards.evaluation import metrics_at_k

        part = None
        if self.placement is not None:
            j = self.plan.index(self.placement)
            lo, hi = engine_share(0, len(data.held_out), len(self.plan), j)
            part = (j, data.evaluate_share(self.engine, k=k, lo=lo, hi=hi))
        parts = [part]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, part)
        if self.rank != 0:
            return {}
        parts = [p for _, p in sorted((x for x in parts if x is not None), key=lambda x: x[0])]
        return metrics_at_k(*([x for p in parts for x in p[i]] for i in range(3)))

    # ------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Release the engines' memory while the models compute (see RolloutEngine.sleep)."""
        for engine in (self.engine, self.sampler):
            if engine is not None:
                engine.sleep()

    def wake(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Restore the student engine's pools (weights before a refit, the KV cache after it)."""
        if self.engine is not None:
            self.engine.wake_up(tags)

    def wake_sampler(self) -> None:
        if self.sampler is not None:  # the teacher's engine: fixed weights, nothing to refit
            self.sampler.wake_up()

    def load_weights(self, model, spec, version: int):
        """Refit every student engine from the sharded `model`, whose weights have taken `version`
        optimizer steps (collective; rollout/refit.py)."""
        from megatron_opd.rollout.refit import refit

        stats = refit(self.engine, model, spec, self.cfg.rollout.refit_bucket_mb,
                      dtype=getattr(torch, self.cfg.rollout.dtype), receivers=self.receivers)
        self.version = version
        return stats

    def shutdown(self) -> None:
        for engine in (self.sampler, self.engine):
            if engine is not None:
                engine.shutdown()
        self.engine = self.sampler = None
