"""RolloutEngine: sampling semantics, batch alignment, start-up errors; mismatch monitor."""

import json
from pathlib import Path

import pytest
import torch

from megatron_opd.rollout.monitor import logprob_gap, probe_rows
from mopd_testing import run_ranks


@pytest.mark.vllm
def test_generate_semantics_and_clear_startup_errors(vllm_dense_ckpt, tmp_path):
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    out = run_ranks(Path(__file__).parent / "workers" / "engine_check.py", 1, "--ckpt", str(vllm_dense_ckpt),
                    "--bad-arch", str(bad), timeout=400)
    errors = json.loads([l for l in out.splitlines() if l.startswith('{"errors"')][-1])["errors"]
    assert "student.checkpoint" in errors["missing"]
    assert "LlamaForCausalLM" in errors["arch"] and "not supported" in errors["arch"]


def test_logprob_gap_and_probe_rows():
    t = torch.tensor([[-1.0, -2.0, 0.0]])
    r = torch.tensor([[-1.5, -2.0, -9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    g = logprob_gap(t, r, m)
    assert g == {"mismatch/max_abs": 0.5, "mismatch/mean_abs": 0.25}
    assert probe_rows(8, 2) == [0, 4] and probe_rows(3, 0) == []
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_gap(t, r[:, :2], m)
