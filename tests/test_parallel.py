"""Layout validation against megatron-core's own rules: every recipe, a grid of layouts checked
against `initialize_model_parallel` itself (fake process groups), and the messages of refusals."""

import itertools
import json
import os
import subprocess
import sys

import pytest

from megatron_opd.config import load_config
from megatron_opd.parallel import ParallelConfig, validate_layout
from mopd_testing import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "configs" / "recipes").glob("*.yaml"))
# demo / tiny recipes name no teacher checkpoint (built at run time); any path satisfies the schema.
PLACEHOLDER = ["teachers=[{checkpoint: /nonexistent}]"]


def _load(recipe, extra=()):
    try:
        return load_config(recipe, list(extra))
    except ValueError as exc:
        if "at least one teacher" not in str(exc):
            raise
        return load_config(recipe, [*PLACEHOLDER, *extra])


def _oracle(cases):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "workers" / "layout_oracle.py"),
                          json.dumps(cases)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_layout_is_valid_for_its_gpu_count(recipe):
    from megatron_opd.rollout.dedicated import trainer_world

    cfg = _load(recipe)
    world = cfg.launch.nodes * cfg.launch.gpus_per_node if cfg.parallel.model_parallel_size > 1 else 1
    world = trainer_world(cfg, world)  # without dedicated engine GPUs
    layout = validate_layout(cfg.parallel, world)
    assert layout.dp * layout.tp * layout.pp == world


def test_validator_agrees_with_megatron_core_on_recipes_and_a_grid():
    """The validator's verdict equals megatron-core's initialize_model_parallel on every case."""
    cases = set()
    for recipe in RECIPES:
        cfg = _load(recipe)
        p = cfg.parallel
        from megatron_opd.rollout.dedicated import trainer_world

        for world in (trainer_world(cfg, cfg.launch.nodes * cfg.launch.gpus_per_node), 8):
            cases.add((world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                       p.expert_model_parallel_size, p.etp))
            # the layout these recipes had before ETP was exposed (ETP = TP): refused at 32 GPUs
            cases.add((world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                       p.expert_model_parallel_size, p.tensor_model_parallel_size))
    for world, tp, pp, ep, etp in itertools.product((4, 8, 12), (1, 2, 4), (1, 2), (1, 2, 4, 8), (1, 2)):
        cases.add((world, tp, pp, ep, etp))
    cases = sorted(cases)
    truth = _oracle(cases)
    disagreements = []
    for world, tp, pp, ep, etp in cases:
        cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        try:
            layout = validate_layout(cfg, world)
            ours = ["ok", layout.dp, layout.expert_dp]
        except ValueError:
            ours = ["refused"]
        theirs = truth[f"{world} {tp} {pp} {ep} {etp}"]
        if ours[0] != theirs[0] or (ours[0] == "ok" and ours != theirs):
            disagreements.append(((world, tp, pp, ep, etp), ours, theirs))
    assert not disagreements, disagreements[:5]
    assert sum(v[0] == "refused" for v in truth.values()) > 10  # the grid does exercise refusals


def test_old_recipe_layout_is_refused_naming_etp_ep_pp_and_world():
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml",
                      ["parallel.expert_tensor_parallel_size=null"])
    with pytest.raises(ValueError, match=r"world size 32 .*ETP x EP x PP = 4 x 8 x 2 = 64.*ETP = TP"):
        validate_layout(cfg.parallel, 32)


def test_submit_and_estimator_refuse_it_too():
    from launch.submit import check_layout
    from tools.estimate_memory import estimate_recipe

    recipe = REPO_ROOT / "configs" / "recipes" / "reopold_30b_a3b_to_4b.yaml"
    bad = ["parallel.expert_tensor_parallel_size=null"]
    with pytest.raises(ValueError, match=r"launch.nodes x gpus_per_node = 4 x 8: world size 32.*= 64"):
        check_layout(load_config(recipe, bad), 8)
    with pytest.raises(ValueError, match=r"ETP x EP x PP = 4 x 8 x 2 = 64"):
        estimate_recipe(str(recipe), bad)


def test_expert_tensor_parallel_must_divide_expert_ffn():
    from mopd_testing import tiny_spec

    moe = tiny_spec("tiny_qwen3_moe")
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=3 does not divide"):
        moe.validate_parallel(tp=1, pp=1, ep=1, etp=3)
