"""rollout/dedicated.py without engines: the two roles of a job, a step's batch cut into replica shares, and
the settings refused before any process starts (the end-to-end runs are in tests/test_trainer_dedicated.py)."""

import pytest

from megatron_opd.config import load_config
from megatron_opd.rollout.dedicated import Rollout, is_engine_rank, trainer_world
from megatron_opd.rollout.engine import RolloutBatch, RolloutSample
from mopd_testing import REPO_ROOT

RECIPE = str(REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml")
DEDICATED = ["rollout.placement=dedicated", "rollout.dedicated_ranks=1", "rollout.engines_per_replica=null"]


def config(*overrides):
    return load_config(RECIPE, list(overrides), require_teachers=False)


def test_the_last_ranks_of_the_job_run_engines_and_the_rest_train():
    cfg = config("rollout.placement=dedicated", "rollout.dedicated_ranks=2", "rollout.engines_per_replica=null")
    assert trainer_world(cfg, 6) == 4
    assert [is_engine_rank(cfg, r, 6) for r in range(6)] == [False] * 4 + [True] * 2
    assert trainer_world(config(), 6) == 6 and not is_engine_rank(config(), 5, 6)
    with pytest.raises(ValueError, match="rollout.dedicated_ranks=2 leaves no trainer rank"):
        trainer_world(cfg, 2)


@pytest.mark.parametrize("overrides, message", [
    (["train.max_staleness=1"], "train.max_staleness=1 .* set rollout.placement=dedicated"),
    (["rollout.dedicated_ranks=1"], "rollout.dedicated_ranks is used by rollout.placement=dedicated only"),
    (["rollout.placement=dedicated", "rollout.engines_per_replica=null"], "needs rollout.dedicated_ranks >= 1"),
    ([*DEDICATED, "rollout.tensor_parallel_size=2"], "each dedicated rank runs one engine of TP 1"),
    ([*DEDICATED[:2]], "each dedicated rank runs one engine of TP 1"),  # the recipe's engines_per_replica: 1
    ([*DEDICATED, "objective.name=sft", "objective.gopd=null"], "objective.name=sft .* colocated only"),
    (["train.max_staleness=2"], "train.max_staleness=2: use 0"),
    (["rollout.placement=separate"], "rollout.placement='separate'"),
], ids=["staleness-colocated", "ranks-colocated", "no-ranks", "engine-tp", "engines-per-replica", "sft",
        "staleness-2", "unknown"])
def test_settings_the_placement_does_not_use_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(*overrides)


def test_a_steps_batch_is_cut_into_replica_shares_without_changing_it():
    samples = [RolloutSample(prompt_index=p, prompt_ids=[p], response_ids=[p, k], response_logprobs=[-1.0, -2.0],
                             finish_reason="stop", text="") for p in range(4) for k in range(2)]
    rollout = Rollout(step=3, version=2, prompts=[{"prompt": str(p)} for p in range(4)],
                      batch=RolloutBatch(samples=samples), rewards=[float(i) for i in range(8)])
    part = rollout.part(2, 4)
    assert part.first_index == 2 and part.version == 2
    assert [s.prompt_index for s in part.batch.samples] == [0, 0, 1, 1]  # relative to the share
    assert [s.response_ids for s in part.batch.samples] == [[2, 0], [2, 1], [3, 0], [3, 1]]
    assert part.rewards == [4.0, 5.0, 6.0, 7.0] and part.prompts == [{"prompt": "2"}, {"prompt": "3"}]
    assert [s.prompt_index for s in rollout.batch.samples] == [p for p in range(4) for _ in range(2)]


def test_the_mailbox_keeps_each_queue_in_order_and_only_what_is_in_flight():
    """Bridge messages through one store: per-pair order, the same command to every engine, and a message
    deleted once read (the run's samples must not pile up in torchrun's store)."""
    import torch.distributed as dist

    from megatron_opd.rollout.dedicated import Mailbox

    store = dist.HashStore()
    trainer, engines = Mailbox(store, 0, 3), [Mailbox(store, 1, 3), Mailbox(store, 2, 3)]
    trainer.to_engines(("generate", 1))
    trainer.to_engines(("refit", 2))
    engines[1].send(("samples", "b"), 0)
    engines[0].send(("samples", "a"), 0)
    assert [engines[0].recv(0), engines[0].recv(0)] == [("generate", 1), ("refit", 2)]
    assert engines[1].recv(0) == ("generate", 1)
    assert [trainer.recv(1), trainer.recv(2)] == [("samples", "a"), ("samples", "b")]
    assert store.num_keys() == 1  # engine 2's unread ("refit", 2)
    assert engines[1].recv(0) == ("refit", 2) and store.num_keys() == 0
