"""Tiny HF checkpoints (random weights, built locally) shared by the model tests."""

import pytest

from megatron_opd.models.hf_tiny import save_tiny_checkpoint
from mopd_testing import tiny_spec


@pytest.fixture(scope="session")
def tiny_dense_ckpt(tmp_path_factory):
    # init_std 0.1 gives logits with O(1) spread, so a mapping error shows up as a large difference.
    return save_tiny_checkpoint(tiny_spec("tiny_qwen3"), tmp_path_factory.mktemp("dense"), init_std=0.1)


@pytest.fixture(scope="session")
def tiny_tied_ckpt(tmp_path_factory):
    spec = tiny_spec("tiny_qwen3", tie_word_embeddings=True)
    return save_tiny_checkpoint(spec, tmp_path_factory.mktemp("tied"), init_std=0.1)


@pytest.fixture(scope="session")
def tiny_moe_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tiny_spec("tiny_qwen3_moe"), tmp_path_factory.mktemp("moe"), init_std=0.1)
