"""Dedicated rollout ranks: the last `rollout.dedicated_ranks` ranks of the job run one vLLM engine each and
nothing else, so generation can overlap training (`train.max_staleness: 1`, one-step-off).

    ranks 0 .. T-1        the trainer: megatron-core's TP x PP x DP layout over T ranks, its own
                          torch.distributed world
    ranks T .. T+E-1      engine ranks (`serve_engine`): one engine each, on their own devices

The two sides talk over a *bridge* that only trainer rank 0 and the engine ranks join (bridge rank 0 is
trainer rank 0, engine e is bridge rank e + 1), built on the job's store outside torch.distributed's
world: commands and samples are pickled objects through the store (`Mailbox`: one ordered queue per
direction and engine, each message deleted once read), weights are tensors through a gloo (NCCL on GPU)
group built with vLLM's stateless helpers.

Commands are processed by every engine in the order rank 0 sent them, and sending never waits:

    ("generate", step, prompts)   engine e samples its contiguous part of the step's prompts (the same
                                  per-prompt seeds as colocated engines: samples do not depend on the
                                  placement), verifies them and sends them back
    ("refit", slot_bytes, buckets) then per bucket ("bucket", k, layout) and its bytes, then ("end", ok):
                                  the student's new weights, loaded between two generations
    ("evaluate", k)               held-out avg@k of the engine's part of the held-out prompts
    ("stop",)

So with one-step-off the trainer sends "generate k+1" before it scores and updates step k, and the
refit that follows waits (in its first bucket) until the engines have finished that generation: batch
k+1 comes from the weights step k trains from, one optimizer step behind the update that trains on it. The trainer side (`DedicatedRollout`) keeps every submitted batch until its step has
trained, so a checkpoint can hold the batch in flight (`in_flight`) and a resumed run trains on exactly
those samples.

GPU (written, not run on a GPU): the bridge's tensor group is NCCL, the engine's device its LOCAL_RANK.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_opd.rollout.colocated import StepSamples, replica_share
from megatron_opd.rollout.engine import RolloutBatch, RolloutEngineError
from megatron_opd.rollout.placement import engine_share

#: Where a checkpoint keeps the batches generated ahead of the update that trains on them.
IN_FLIGHT_FILE = "in_flight.pt"


@dataclass
class Rollout:
    """One step's samples over all its prompts (every replica's), as the engines returned them."""

    step: int
    """The step whose update trains on it."""

    version: int
    """Optimizer steps the weights that generated it had taken (step - version = its staleness)."""

    prompts: list[dict]
    batch: RolloutBatch
    """rollout.n samples per prompt, in prompt order; `prompt_index` is the prompt's index in `prompts`."""

    rewards: list[float]

    generated: Optional[tuple[float, float]] = None
    """Wall-clock time (time.time()) the engines started and finished generating it (the timeline of
    benchmarks/bench_async.py)."""

    def part(self, lo: int, hi: int) -> StepSamples:
        """The samples of prompts [lo, hi) (one replica's share), indices relative to lo; the stored
        samples are not changed."""
        keep = [(replace(s, prompt_index=s.prompt_index - lo), r)
                for s, r in zip(self.batch.samples, self.rewards) if lo <= s.prompt_index < hi]
        return StepSamples(prompts=list(self.prompts[lo:hi]), first_index=lo,
                           batch=RolloutBatch(samples=[s for s, _ in keep]), rewards=[r for _, r in keep],
                           version=self.version)


# ----------------------------------------------------------------------------------------------
# the job's two roles
# ----------------------------------------------------------------------------------------------
def trainer_world(cfg, launched: int) -> int:
    """Ranks that train out of the `launched` ranks of the job; raises ValueError naming the field."""
    engines = cfg.rollout.engine_ranks
    if engines and launched - engines < 1:
        raise ValueError(f"rollout.dedicated_ranks={engines} leaves no trainer rank in a job of {launched} "
                         "ranks; lower it or launch more ranks")
    return launched - engines


def is_engine_rank(cfg, rank: int, launched: int) -> bool:
    return rank >= trainer_world(cfg, launched)


def claim_cores(cfg) -> None:
    """With dedicated engine ranks the job's processes compute at the same time: on CPU each rank keeps to
    its own cores (`platform.pin_rank`), trainer and engine ranks alike; nothing to do when colocated (the
    engines and the models take turns) or on GPU."""
    from megatron_opd import platform

    if cfg.rollout.placement == "dedicated":
        platform.pin_rank(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _job_store(timeout: datetime.timedelta):
    """A client of the job's rendezvous store (torchrun's agent store, which outlives every rank), or,
    launched without torchrun's agent, a store that global rank 0 (a trainer) serves on MASTER_PORT + 1."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
    return dist.TCPStore(host, port + 1, is_master=int(os.environ["RANK"]) == 0, timeout=timeout,
                         wait_for_workers=False)


class Mailbox:
    """Pickled objects between bridge rank 0 and each engine rank through the job's store: one ordered queue
    per direction and pair, and a message is deleted once read, so the store holds only what is in flight
    (a run's samples would otherwise pile up in torchrun's agent for the whole run). Sending never waits;
    receiving waits up to the store's timeout (`parallel.timeout_minutes`)."""

    def __init__(self, store, rank: int, size: int):
        self.store, self.rank, self.size = store, rank, size
        self.sent: Counter = Counter()
        self.received: Counter = Counter()

    def send(self, obj, dst: int) -> None:
        self.store.set(f"{self.rank}->{dst}/{self.sent[dst]}", pickle.dumps(obj))
        self.sent[dst] += 1

    def recv(self, src: int):
        key = f"{src}->{self.rank}/{self.received[src]}"
        data = self.store.get(key)
        self.store.delete_key(key)
        self.received[src] += 1
        return pickle.loads(data)

    def to_engines(self, obj) -> None:
        """(Bridge rank 0) the same command to every engine rank."""
        for dst in range(1, self.size):
            self.send(obj, dst)


class Bridge:
    """Trainer rank 0 (bridge rank 0) and the engine ranks: objects through the store, tensors through a
    process group of their own."""

    def __init__(self, rank: int, size: int, timeout_minutes: int):
        from megatron_opd import platform

        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _job_store(timeout)
        # a torchrun restart keeps its agent's store: each attempt gets its own keys
        prefix = f"mopd_bridge/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.rank, self.size = rank, size
        self._kept: dict[int, list] = {}
        self.objects = Mailbox(dist.PrefixStore(f"{prefix}/objects", store), rank, size)
        self.tensors = platform.bridge_group(dist.PrefixStore(f"{prefix}/tensors", store), rank, size, timeout)

    def reply(self, src: int, kind: str):
        """(Bridge rank 0) the next reply of kind `kind` from bridge rank `src`. An engine answers its
        commands in order, and rank 0 may wait for a later answer first (a refit's, while a generation
        sent before it is still in the channel): replies of other kinds are kept for later, in order."""
        kept = self._kept.setdefault(src, [])
        for i, reply in enumerate(kept):
            if reply[0] in (kind, "error"):
                return _expect(kept.pop(i), kind)
        while True:
            reply = self.objects.recv(src)
            if reply[0] in (kind, "error"):
                return _expect(reply, kind)
            kept.append(reply)

    def broadcast(self, tensor: torch.Tensor):
        """Broadcast from bridge rank 0 into `tensor` (in place); returns the work to wait on."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.tensors.broadcast([tensor], opts)


# ----------------------------------------------------------------------------------------------
# the engine ranks
# ----------------------------------------------------------------------------------------------
def serve_engine(cfg) -> int:
    """The whole life of one engine rank: start its engine, report its manifest (or why it could not
    start), then serve commands until "stop". Returns the process's exit code."""
    from megatron_opd import parallel
    from megatron_opd.builders import resolve_models
    from megatron_opd.data.bundle import DataBundle
    from megatron_opd.rollout.engine import RolloutEngine

    # A preemption signal is the trainer's to act on: it checkpoints (with the batch this engine is
    # generating) and then stops the engines. An engine that died first would lose that batch.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    claim_cores(cfg)
    launched, rank = parallel.launched_world_size(), parallel.launched_rank()
    index = rank - trainer_world(cfg, launched)
    count = cfg.rollout.engine_ranks
    bridge = Bridge(index + 1, count + 1, cfg.parallel.timeout_minutes)
    try:
        models = resolve_models(cfg)
        data = DataBundle(cfg, models.student.path)
        local = int(os.environ.get("LOCAL_RANK", rank))
        engine = RolloutEngine(cfg.rollout, models.student.path, seed=cfg.train.seed, in_process=True,
                               system_prompt=cfg.data.system_prompt, devices=(local,), world_size=launched,
                               colocated=False)
    except Exception as exc:
        bridge.objects.send(("error", f"engine rank {rank}: {type(exc).__name__}: {exc}"), 0)
        return 1
    bridge.objects.send(("ready", engine.expected_tensors()), 0)
    try:
        while True:
            command = bridge.objects.recv(0)
            if command[0] == "stop":
                return 0
            if command[0] == "generate":
                _, step, prompts = command
                a, b = engine_share(0, len(prompts), count, index)
                part = list(prompts[a:b])
                reply = None
                try:
                    from megatron_opd.faults import maybe_fail

                    maybe_fail("engine_generate")  # fault-injection point (tests): a kill mid-generation
                    started = time.time()
                    batch = engine.generate([s["prompt"] for s in part], n=cfg.rollout.n,
                                            seed=sampling_seed(cfg, step), first_index=a)
                    rewards = data.verify(batch, part)
                    for s in batch.samples:  # global prompt indices
                        s.prompt_index += a
                    reply = ("samples", step, batch, list(rewards), (started, time.time()))
                except Exception as exc:
                    reply = ("error", f"engine rank {rank}, step {step}: {type(exc).__name__}: {exc}")
                bridge.objects.send(reply, 0)
            elif command[0] == "evaluate":
                lo, hi = engine_share(0, len(data.held_out), count, index)
                try:
                    reply = ("evaluated", data.evaluate_share(engine, k=command[1], lo=lo, hi=hi))
                except Exception as exc:
                    reply = ("error", f"engine rank {rank}, evaluation: {type(exc).__name__}: {exc}")
                bridge.objects.send(reply, 0)
            elif command[0] == "refit":
                bridge.objects.send(("refit", _receive_refit(bridge, engine, *command[1:])), 0)
            else:
                raise RuntimeError(f"engine rank {rank}: unknown command {command[0]!r}")
    finally:
        engine.shutdown()


def _receive_refit(bridge: Bridge, engine, slot_bytes: int, buckets: int) -> Optional[str]:
    """Receive one refit's buckets into the engine's transport slot and load them; returns the error
    (None: loaded). Every broadcast is joined even after a failure, so the trainer never hangs."""
    error = None
    try:
        engine.begin_refit(slot_bytes, buckets=buckets)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    scratch = None
    while True:
        message = bridge.objects.recv(0)
        if message[0] == "end":
            complete = message[1] and error is None
            try:
                engine.end_refit(complete=complete)
                if complete:
                    engine.reset_prefix_cache()
            except Exception as exc:
                error = error or f"{type(exc).__name__}: {exc}"
            return error
        _, k, layout, nbytes = message
        if error is None:
            try:
                target = engine.slot(k)[:nbytes]
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            if scratch is None or scratch.numel() < nbytes:
                scratch = torch.empty(nbytes, dtype=torch.uint8)
            target = scratch[:nbytes]
        bridge.broadcast(target).wait()
        if error is None:
            try:
                from megatron_opd.rollout.transport import TensorSlot

                engine.load_bucket(k, [TensorSlot.from_tuple(row) for row in layout])
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"


def sampling_seed(cfg, step: int) -> int:
    """The base seed of a step's samples (per prompt: RolloutEngine.generate adds the prompt's global
    index), the same for colocated and dedicated engines."""
    return cfg.train.seed * 1_000_003 + step


# ----------------------------------------------------------------------------------------------
# the trainer side
# ----------------------------------------------------------------------------------------------
class _BridgeSender:
    """What `rollout.refit.refit` needs of "the engine" on trainer rank 0: the transport slots are local
    buffers whose bytes are broadcast to every engine rank, which loads them into its engine."""

    def __init__(self, bridge: Bridge, manifest: dict):
        self.bridge, self.manifest = bridge, manifest
        self._slots: list[torch.Tensor] = []
        self._work: list = [None, None]

    def expected_tensors(self) -> dict:
        return self.manifest

    def begin_refit(self, slot_bytes: int, buckets: int = 2) -> None:
        from megatron_opd import platform

        if len(self._slots) < 2 or self._slots[0].numel() < slot_bytes:
            self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=platform.collective_device())
                           for _ in range(2)]
        self._work = [None, None]
        self.bridge.objects.to_engines(("refit", slot_bytes, buckets))

    def slot(self, bucket: int) -> torch.Tensor:
        """A free local slot (its previous broadcast finished)."""
        index = bucket % 2
        work, self._work[index] = self._work[index], None
        if work is not None:
            work.wait()
        return self._slots[index]

    def load_bucket(self, bucket: int, layout) -> None:
        index = bucket % 2
        rows = [s.as_tuple() for s in layout]
        nbytes = max((s.offset + s.nbytes for s in layout), default=0)
        self.bridge.objects.to_engines(("bucket", bucket, rows, nbytes))
        self._work[index] = self.bridge.broadcast(self._slots[index][:nbytes])

    def end_refit(self, complete: bool) -> None:
        from megatron_opd.rollout.refit import RefitError

        for i in range(2):
            self.slot(i)
        self.bridge.objects.to_engines(("end", complete))
        errors = [self.bridge.reply(e, "refit")[1] for e in range(1, self.bridge.size)]
        failed = next(((e, x) for e, x in enumerate(errors) if x is not None), None)
        if failed is not None:
            raise RefitError(f"dedicated engine {failed[0]} failed to load the weights: {failed[1]}")


def _expect(reply, kind: str):
    if reply[0] == "error":
        raise RolloutEngineError(reply[1])
    if reply[0] != kind:
        raise RuntimeError(f"dedicated engine replied {reply[0]!r} where {kind!r} was expected")
    return reply


class DedicatedRollout:
    """The trainer's view of the dedicated engine ranks: the calls of ColocatedRollout (rollout/colocated.py),
    collective over the trainer's ranks. Only trainer rank 0 talks to the engines; what they return
    reaches every trainer rank by a broadcast over the trainer's world."""

    def __init__(self, cfg, spec, step: int = 0):
        self.cfg, self.spec = cfg, spec
        self.count = cfg.rollout.engine_ranks
        self.rank = dist.get_rank()
        self.version = step
        """Optimizer steps of the weights the engines hold."""
        self.submitted: dict[int, tuple[int, list[dict]]] = {}
        """step -> (weights version, prompts) of batches asked of the engines and not yet received."""
        self.ready: dict[int, Rollout] = {}
        """Received batches whose step has not trained yet (every trainer rank holds them)."""
        self.bridge = self.sender = None
        error = None
        if self.rank == 0:
            self.bridge = Bridge(0, self.count + 1, cfg.parallel.timeout_minutes)
            replies = [self.bridge.objects.recv(e) for e in range(1, self.count + 1)]
            error = next((r[1] for r in replies if r[0] == "error"), None)
            if error is None:
                self.sender = _BridgeSender(self.bridge, replies[0][1])
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            if self.bridge is not None:
                self.bridge.objects.to_engines(("stop",))
            raise RolloutEngineError(f"a dedicated engine failed to start: {box[0]}")

    @property
    def asleep(self) -> Optional[list[str]]:
        return None

    # ------------------------------------------------------------------------------------------
    def submit(self, prompts: Sequence[dict], step: int) -> None:
        """Ask the engines for `step`'s batch (all of the step's prompts, the same list on every rank);
        returns at once: the engines generate with the weights they hold now."""
        if self.rank == 0:
            self.bridge.objects.to_engines(("generate", step, list(prompts)))
        self.submitted[step] = (self.version, list(prompts))

    def has(self, step: int) -> bool:
        return step in self.submitted or step in self.ready

    def collect(self, step: int) -> StepSamples:
        """This replica's share of `step`'s batch (waits for the engines if it is not in yet)."""
        if step not in self.ready:
            self._receive(step)
        rollout = self.ready[step]
        return rollout.part(*replica_share(len(rollout.prompts)))

    def _receive(self, step: int) -> None:
        """Collective: the engines' parts of the submitted batch `step`, on every trainer rank."""
        if step not in self.submitted:
            raise RuntimeError(f"step {step}'s batch was never submitted to the dedicated engines")
        version, prompts = self.submitted.pop(step)
        rollout = None
        if self.rank == 0:
            batch, rewards, spans = RolloutBatch(), [], []
            for e in range(1, self.count + 1):
                _, got, part, part_rewards, span = self.bridge.reply(e, "samples")
                if got != step:
                    raise RuntimeError(f"dedicated engine {e - 1} sent step {got}'s samples, expected step {step}")
                batch.samples += part.samples
                rewards += part_rewards
                spans.append(span)
            rollout = Rollout(step=step, version=version, prompts=prompts, batch=batch, rewards=rewards,
                              generated=(min(a for a, _ in spans), max(b for _, b in spans)))
        box = [rollout]
        dist.broadcast_object_list(box, src=0)
        self.ready[step] = box[0]

    def release(self, step: int) -> None:
        """`step` has trained: its batch is no longer in flight."""
        self.ready.pop(step, None)

    def discard_after(self, step: int) -> None:
        """Collective: drop every batch asked for beyond `step` (a step abandoned on preemption draws its
        successor's prompts again when it resumes): waits for the engines' replies, then forgets them."""
        for s in sorted(x for x in self.submitted if x > step):
            self._receive(s)
        for s in [x for x in self.ready if x > step]:
            del self.ready[s]

    def in_flight(self) -> list[Rollout]:
        """Collective: every batch generated ahead of its update (received first if still generating),
        for the checkpoint."""
        for s in sorted(self.submitted):
            self._receive(s)
        return [self.ready[s] for s in sorted(self.ready)]

    def restore(self, rollouts: list[Rollout]) -> None:
        for r in rollouts:
            self.ready[r.step] = r

    # ------------------------------------------------------------------------------------------
    def evaluate(self, data, k: int) -> dict:
        """Held-out avg@k with the engines' current weights, the prompts spread over the engines
        (metrics on global rank 0, {} elsewhere). It queues behind a generation in progress."""
        from megatron_opd.rewards.evaluation import metrics_at_k

        if self.rank != 0:
            return {}
        self.bridge.objects.to_engines(("evaluate", k))
        parts = [self.bridge.reply(e, "evaluated")[1] for e in range(1, self.count + 1)]
        return metrics_at_k(*([x for p in parts for x in p[i]] for i in range(3)))

    def sleep(self) -> None:
        """The engines have devices of their own: nothing to release."""

    def wake(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Nothing was released (`sleep`)."""

    def wake_sampler(self) -> None:
        """No sampler engine (objectives that sample from a teacher are colocated only)."""

    def load_weights(self, model, spec, version: int):
        """Collective: the student's weights to every engine rank (rollout/refit.py's export, trainer rank
        0 the one receiver, its buckets broadcast over the bridge). The engines load them after the
        generation they are running."""
        from megatron_opd.rollout.refit import refit

        # each engine resets its own prefix cache after a complete refit (`_receive_refit`)
        stats = refit(self.sender, model, spec, self.cfg.rollout.refit_bucket_mb,
                      dtype=getattr(torch, self.cfg.rollout.dtype), receivers={0}, reset_cache=False)
        self.version = version
        return stats

    def shutdown(self) -> None:
        if self.bridge is not None:
            self.bridge.objects.to_engines(("stop",))
            self.bridge = None


def save_in_flight(path: Path, rollouts: list[Rollout]) -> None:
    """Into a checkpoint directory being written (rank 0)."""
    if rollouts:
        torch.save(rollouts, path / IN_FLIGHT_FILE)


def load_in_flight(path: Path) -> list[Rollout]:
    f = Path(path) / IN_FLIGHT_FILE
    return torch.load(f, weights_only=False) if f.is_file() else []
