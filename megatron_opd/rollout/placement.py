"""Where the rollout engines run: pure functions of the job's layout, tested on every cluster recipe.

Colocated (the one placement so far), every data-parallel replica's TP x PP ranks are cut into groups
of `rollout.tensor_parallel_size` (engine TP) ranks and each group hosts one vLLM engine whose shards
sit on exactly that group's devices, so a job of W ranks runs W / engine-TP engines and every device
holds one engine shard beside its trainer rank (`rollout.engines_per_replica` can ask for fewer).

Megatron-core orders ranks "tp-cp-ep-dp-pp" (`parallel.initialize`): global rank = tp_rank + TP *
(dp_rank + DP * pp_rank). A replica's ranks, taken in (pp_rank, tp_rank) order, are cut into
consecutive groups, so an engine whose TP divides the training TP lies inside one TP group: adjacent
ranks, one node, the fastest links. The group's first rank owns the engine (the `vllm.LLM` object and
its engine-core process); the engine's workers are started on the group's devices.

Prompts follow the same order: the replica's share of a step (`replica_share`) is cut into one
contiguous part per engine (`engine_share`), and every prompt's sampling seed depends only on its
global index and the step, so the samples never depend on how many engines there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class EnginePlacement:
    """One engine of the job."""

    replica: int
    """The data-parallel replica whose prompts it generates."""

    index: int
    """Its position among the replica's engines (the order of the replica's prompt parts)."""

    ranks: tuple[int, ...]
    """Global trainer ranks whose devices host its shards, in engine-TP order; ranks[0] owns it."""

    node: int
    """The node of those ranks (an engine never spans nodes)."""

    devices: tuple[int, ...]
    """Node-local device indices of its shards (CUDA_VISIBLE_DEVICES of its process on a GPU node)."""

    @property
    def owner(self) -> int:
        return self.ranks[0]


def replica_ranks(replica: int, tp: int, pp: int, dp: int) -> list[int]:
    """Global ranks of one data-parallel replica in (pp_rank, tp_rank) order (megatron's tp-cp-ep-dp-pp)."""
    return [t + tp * (replica + dp * p) for p in range(pp) for t in range(tp)]


def check_engine_layout(tp: int, pp: int, engine_tp: int, engines_per_replica: Optional[int] = None,
                        num_attention_heads: Optional[int] = None,
                        num_query_groups: Optional[int] = None) -> int:
    """Validate an engine size against the training layout (and the model's heads); returns the number
    of engines per replica. Raises ValueError naming `rollout.tensor_parallel_size` and the fix."""
    replica = tp * pp
    if engine_tp < 1 or replica % engine_tp:
        divisors = [d for d in range(1, replica + 1) if replica % d == 0]
        raise ValueError(
            f"rollout.tensor_parallel_size={engine_tp} does not divide a data-parallel replica of "
            f"{replica} ranks (TP {tp} x PP {pp}): every engine must lie on ranks of one replica; use one "
            f"of {divisors}")
    if num_attention_heads is not None and num_attention_heads % engine_tp:
        raise ValueError(
            f"rollout.tensor_parallel_size={engine_tp} does not divide the model's {num_attention_heads} "
            "attention heads (vLLM splits heads over its TP workers); use a divisor of the head count")
    if num_query_groups is not None and num_query_groups % engine_tp and engine_tp % num_query_groups:
        raise ValueError(
            f"rollout.tensor_parallel_size={engine_tp} and the model's {num_query_groups} KV heads: vLLM "
            "needs one to divide the other; use a divisor or a multiple of the KV-head count")
    most = replica // engine_tp
    if engines_per_replica is None:
        return most
    if not 1 <= engines_per_replica <= most or most % engines_per_replica:
        raise ValueError(
            f"rollout.engines_per_replica={engines_per_replica}: a replica of {replica} ranks holds at most "
            f"{most} engines of rollout.tensor_parallel_size={engine_tp}, and the count must divide {most}; "
            "use null (every device hosts an engine shard) or such a divisor")
    return engines_per_replica


def plan_engines(world: int, tp: int, pp: int, engine_tp: int = 1, gpus_per_node: Optional[int] = None,
                 engines_per_replica: Optional[int] = None) -> list[EnginePlacement]:
    """Every engine of a colocated job, replica by replica. `gpus_per_node` None: one node of `world`
    devices (a local run). With fewer engines than groups (`engines_per_replica`) the engines take
    evenly spaced groups, so they spread over the replica's devices."""
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of TP {tp} x PP {pp}")
    dp = world // (tp * pp)
    count = check_engine_layout(tp, pp, engine_tp, engines_per_replica)
    per_node = gpus_per_node or world
    groups_per_replica = tp * pp // engine_tp
    stride = groups_per_replica // count
    plan = []
    for r in range(dp):
        ranks = replica_ranks(r, tp, pp, dp)
        for i in range(count):
            g = i * stride
            group = tuple(ranks[g * engine_tp:(g + 1) * engine_tp])
            nodes = {rank // per_node for rank in group}
            if len(nodes) != 1:
                raise ValueError(
                    f"rollout.tensor_parallel_size={engine_tp}: the engine on ranks {list(group)} would span "
                    f"nodes {sorted(nodes)} ({per_node} devices per node); use an engine TP that divides the "
                    f"training TP ({tp}) so that each engine stays inside one tensor-parallel group")
            plan.append(EnginePlacement(replica=r, index=i, ranks=group, node=nodes.pop(),
                                        devices=tuple(rank % per_node for rank in group)))
    return plan


def plan_for_config(cfg, world: int, gpus_per_node: Optional[int] = None, spec=None) -> list[EnginePlacement]:
    """The engine plan of a run config (`rollout.tensor_parallel_size`, `rollout.engines_per_replica`
    against `parallel` and, given its spec, the student's heads); raises ValueError naming the field."""
    p, r = cfg.parallel, cfg.rollout
    check_engine_layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, r.tensor_parallel_size,
                        r.engines_per_replica, getattr(spec, "num_attention_heads", None),
                        getattr(spec, "num_query_groups", None))
    return plan_engines(world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                        r.tensor_parallel_size, gpus_per_node=gpus_per_node,
                        engines_per_replica=r.engines_per_replica)


def engine_of_rank(plan: list[EnginePlacement], rank: int) -> Optional[EnginePlacement]:
    """The engine this rank owns (None: it owns none; it may still host a shard of one)."""
    return next((e for e in plan if e.owner == rank), None)


def engine_share(lo: int, hi: int, engines: int, index: int) -> tuple[int, int]:
    """[lo, hi) of global prompt indices that engine `index` of a replica serves out of the replica's
    [lo, hi): contiguous parts in engine order, so concatenating them restores the replica's order."""
    n = hi - lo
    return lo + index * n // engines, lo + (index + 1) * n // engines
