"""Engine placement (rollout/placement.py): on every cluster recipe at its GPU count every GPU hosts
exactly one engine shard and no two engines share one; each engine serves ranks of one replica (as
megatron-core's own RankGenerator forms replicas) on one node; impossible engine sizes are refused
naming `rollout.tensor_parallel_size`."""

from pathlib import Path

import pytest

from megatron_opd.rollout.placement import (check_engine_layout, engine_of_rank, engine_share, plan_engines,
                                            plan_for_config, replica_ranks)
from mopd_testing import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "configs" / "recipes").glob("*.yaml"))


def megatron_replicas(tp, pp, dp):
    """Model-parallel groups (one per data-parallel replica) by megatron-core's own rank generator."""
    from megatron.core.parallel_state import RankGenerator

    return RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp").get_ranks("tp-pp")


def cluster_recipes():
    """The recipes that name their cluster size (a `launch:` section of their own or inherited)."""
    return [pytest.param(path, id=path.stem) for path in RECIPES
            if _has_launch(path)]


def _has_launch(path: Path) -> bool:
    import yaml

    doc = yaml.safe_load(path.read_text())
    return "launch" in doc or ("base" in doc and _has_launch(path.parent / doc["base"]))


@pytest.mark.parametrize("recipe", cluster_recipes())
@pytest.mark.parametrize("engine_tp", [1, 2])
def test_every_gpu_of_a_cluster_recipe_hosts_exactly_one_engine_shard(recipe, engine_tp):
    from megatron_opd.config import load_config
    from megatron_opd.models.spec import ModelSpec

    if load_config(recipe, require_teachers=False).rollout.placement == "dedicated":
        pytest.skip("dedicated engine ranks: checked by test_a_dedicated_recipe_trains_on_the_first_gpus")
    cfg = load_config(recipe, [f"rollout.tensor_parallel_size={engine_tp}"], require_teachers=False)
    nodes, per_node = cfg.launch.nodes, cfg.launch.gpus_per_node
    world = nodes * per_node
    spec = ModelSpec.from_yaml(cfg.student.spec)
    plan = plan_for_config(cfg, world, per_node, spec)
    shards = [(e.node, d) for e in plan for d in e.devices]
    assert sorted(shards) == [(n, g) for n in range(nodes) for g in range(per_node)]  # each GPU once
    assert len(plan) == world // engine_tp
    p = cfg.parallel
    replicas = [set(g) for g in megatron_replicas(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                                  world // (p.tensor_model_parallel_size *
                                                            p.pipeline_model_parallel_size))]
    for e in plan:
        assert set(e.ranks) <= replicas[e.replica]  # an engine serves the replica whose GPUs it uses
        assert all(r // per_node == e.node and r % per_node == d for r, d in zip(e.ranks, e.devices))
        assert engine_of_rank(plan, e.owner) == e


def test_a_dedicated_recipe_trains_on_the_first_gpus_and_generates_on_the_last():
    """exopd_30b_a3b_to_4b_async.yaml: the colocated recipe's 32-GPU layout on nodes 0-3, one engine on each
    GPU of node 4; launch.submit and the memory estimate accept it."""
    from launch.submit import check_layout
    from megatron_opd.config import load_config
    from megatron_opd.parallel import validate_layout
    from megatron_opd.rollout.dedicated import is_engine_rank, trainer_world
    from tools.estimate_memory import estimate_recipe

    recipe = REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b_async.yaml"
    cfg = load_config(recipe, require_teachers=False)
    world = cfg.launch.nodes * cfg.launch.gpus_per_node
    assert check_layout(cfg, cfg.launch.gpus_per_node) == world == 40
    assert validate_layout(cfg.parallel, trainer_world(cfg, world)).dp == 4
    assert [r // 8 for r in range(world) if is_engine_rank(cfg, r, world)] == [4] * 8
    est = estimate_recipe(str(recipe))
    assert est["engine_awake"] == 0.0 and est["engine_gpu"] < 80.0 and est["total"] < 80.0


def test_replica_ranks_follow_megatron_rank_order():
    for tp, pp, dp in [(1, 1, 4), (2, 1, 2), (2, 2, 2), (4, 2, 4), (1, 2, 3)]:
        assert [sorted(replica_ranks(r, tp, pp, dp)) for r in range(dp)] == \
            [sorted(g) for g in megatron_replicas(tp, pp, dp)]


def test_engines_of_one_node_never_share_a_gpu():
    """exopd_30b_a3b_to_1p7b (TP2 x PP2 on 4 x 8 GPUs): before, nothing chose an engine's device, so
    every engine of a node took device 0. Now each engine runs on its own ranks' devices — in the
    default placement (32 engines) and in the one-engine-per-replica placement (8 leaders, 4 per node
    of the first pipeline stage)."""
    plan = plan_engines(32, tp=2, pp=2, engine_tp=1, gpus_per_node=8)
    leaders = plan_engines(32, tp=2, pp=2, engine_tp=1, gpus_per_node=8, engines_per_replica=1)
    assert len(plan) == 32 and len(leaders) == 8
    for node in range(4):
        devices = [e.devices for e in leaders if e.node == node]
        assert len(devices) == len(set(devices))
    assert sorted(e.devices for e in leaders if e.node == 0) == [(0,), (2,), (4,), (6,)]


def test_fewer_engines_spread_over_the_replica():
    plan = plan_engines(8, tp=4, pp=2, engine_tp=2, gpus_per_node=8, engines_per_replica=2)
    assert [e.ranks for e in plan] == [(0, 1), (4, 5)]  # stage 0 and stage 1, not two on stage 0


def test_engine_shares_concatenate_to_the_replica_share():
    for lo, hi, engines in [(0, 7, 3), (12, 20, 4), (5, 6, 2), (3, 3, 2)]:
        parts = [engine_share(lo, hi, engines, i) for i in range(engines)]
        assert parts[0][0] == lo and parts[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(tp=4, pp=2, engine_tp=3), r"rollout.tensor_parallel_size=3 does not divide a data-parallel replica of 8"),
    (dict(tp=2, pp=1, engine_tp=2, num_attention_heads=3), r"does not divide the model's 3 attention heads"),
    (dict(tp=4, pp=1, engine_tp=4, num_attention_heads=8, num_query_groups=3), r"3 KV heads"),
    (dict(tp=2, pp=2, engine_tp=1, engines_per_replica=3), r"rollout.engines_per_replica=3"),
])
def test_impossible_engine_layouts_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_engine_layout(**kwargs)


def test_an_engine_spanning_nodes_is_refused():
    # TP1 x PP2, DP over 2 nodes of 2 GPUs: replica 0 is ranks 0 and 2 (two nodes), an engine of TP 2 there
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size=2: the engine on ranks \[0, 2\] would span"):
        plan_engines(4, tp=1, pp=2, engine_tp=2, gpus_per_node=2)


def test_launch_submit_and_the_estimator_refuse_an_impossible_engine_size():
    from launch.submit import check_layout
    from megatron_opd.config import load_config
    from tools.estimate_memory import estimate_recipe

    recipe = REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml"
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size=3"):
        check_layout(load_config(recipe, ["rollout.tensor_parallel_size=3"]), 8)
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size=3"):
        estimate_recipe(str(recipe), ["rollout.tensor_parallel_size=3"])


def test_engine_process_env_places_the_engine_on_its_devices(monkeypatch):
    from megatron_opd import platform

    monkeypatch.setattr(platform, "on_gpu", lambda: True)
    assert platform.engine_process_env((4, 5), world_size=32) == {"CUDA_VISIBLE_DEVICES": "4,5"}
    monkeypatch.setattr(platform, "on_gpu", lambda: False)
    monkeypatch.setattr(platform, "_NODE_CORES", [0, 1])
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert platform.engine_process_env((1,), world_size=2) == {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    assert platform.engine_process_env((0, 1), world_size=2) == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert platform.engine_process_env((0,), world_size=1) == {}  # one process: vLLM's own binding
    monkeypatch.setattr(platform, "_NODE_CORES", list(range(8)))  # more cores than ranks: equal shares
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert platform.engine_process_env((0, 1), world_size=4) == {"VLLM_CPU_OMP_THREADS_BIND": "0-3|4-7"}
    assert [platform.rank_cores(r, 3) for r in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert [platform.rank_cores(r, 16) for r in (0, 9)] == [[0], [1]]  # more ranks than cores: round-robin


def test_a_rank_pins_itself_to_its_cores_only_beside_other_ranks_on_cpu(monkeypatch):
    """The dedicated placement's ranks compute at the same time: each keeps to its own cores."""
    from megatron_opd import platform

    calls = []
    monkeypatch.setattr(platform, "on_gpu", lambda: False)
    monkeypatch.setattr(platform, "_NODE_CORES", [0, 1, 2, 3])
    monkeypatch.setattr(platform.os, "sched_setaffinity", lambda pid, cores: calls.append(("affinity", cores)))
    monkeypatch.setattr(platform.torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    platform.pin_rank(1, 2)
    assert calls == [("affinity", {2, 3}), ("threads", 2)]
    platform.pin_rank(0, 1)  # a single rank keeps every core
    monkeypatch.setattr(platform, "on_gpu", lambda: True)
    platform.pin_rank(1, 2)  # on GPU a rank's device is its GPU
    assert len(calls) == 2
