"""RolloutEngine: sampling semantics, batch alignment, start-up errors; the trainer-vs-engine gap."""

import json
from pathlib import Path

import pytest
import torch

from megatron_opd.objectives.policy_loss import logprob_gap
from mopd_testing import last_json, run_ranks


@pytest.mark.vllm
def test_generate_semantics_sleep_states_and_clear_startup_errors(vllm_dense_ckpt, tmp_path):
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    out = run_ranks(Path(__file__).parent / "workers" / "engine_check.py", 1, "--ckpt", str(vllm_dense_ckpt),
                    "--bad-arch", str(bad), timeout=400)
    result = last_json(out, "errors")
    errors, refused = result["errors"], result["refused"]
    assert "student.checkpoint" in errors["missing"]
    assert "LlamaForCausalLM" in errors["arch"] and "not supported" in errors["arch"]
    # the sleep state machine of a real engine (tests/rollout/workers/engine_check.py)
    assert "already asleep" in refused["sleep_twice"]
    assert "generate on an engine whose ['kv_cache', 'weights']" in refused["generate_asleep"]
    assert "score" in refused["score_asleep"] and "refit" in refused["refit_asleep"]
    assert "['kv_cache'] are asleep" in refused["generate_without_kv_cache"]
    assert "last refit did not complete" in refused["generate_after_incomplete_refit"]
    assert "wake_up tags ['kv']" in refused["unknown_tag"]


def test_logprob_gap():
    t = torch.tensor([[-1.0, -2.0, 0.0]])
    r = torch.tensor([[-1.5, -2.0, -9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    g = logprob_gap(t, r, m)
    assert g == {"mismatch/max_abs": 0.5, "mismatch/mean_abs": 0.25}
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_gap(t, r[:, :2], m)


def test_kv_cache_too_small_or_context_too_long_fails_before_vllm_starts(vllm_dense_ckpt):
    from megatron_opd.config import RolloutConfig
    from megatron_opd.models.spec import ModelSpec
    from megatron_opd.rollout.engine import RolloutEngine, RolloutEngineError, kv_cache_bytes_per_token

    spec = ModelSpec.from_hf_config(vllm_dense_ckpt)
    per_token = kv_cache_bytes_per_token(spec, "float32")
    assert per_token == 2 * 4 * 2 * 32 * 4  # K and V x layers x kv heads x head_dim x fp32
    too_long = 2 * 2**30 // per_token  # one sequence needs 2 GiB
    with pytest.raises(RolloutEngineError, match=r"rollout.kv_cache_gib=1.0 is too small.*at least 2"):
        RolloutEngine(RolloutConfig(max_model_len=too_long, kv_cache_gib=1.0), vllm_dense_ckpt)
    with pytest.raises(RolloutEngineError, match="rollout.max_model_len=1024 exceeds.*=512"):
        RolloutEngine(RolloutConfig(max_model_len=1024, kv_cache_gib=2.0), vllm_dense_ckpt)


def test_enable_thinking_reaches_the_chat_template_or_is_refused(tmp_path):
    """Qwen3's template opens an empty think block when enable_thinking is false; a template without
    the switch cannot honour the field, so it is refused rather than ignored."""
    from transformers import AutoTokenizer

    from megatron_opd.config import RolloutConfig
    from megatron_opd.data.tokenizer import CHAT_TEMPLATE, train_tokenizer
    from megatron_opd.rollout.engine import RolloutEngine, RolloutEngineError, check_chat_template

    train_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(RolloutEngineError, match="rollout.enable_thinking=False but the chat template"):
        check_chat_template(tok, RolloutConfig(enable_thinking=False), tmp_path)
    check_chat_template(tok, RolloutConfig(), tmp_path)  # unset: fine with any template
    # the switch as Qwen3's template has it
    tok.chat_template = CHAT_TEMPLATE + ("{% if add_generation_prompt and enable_thinking is defined and "
                                         "enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}")
    engine = RolloutEngine.__new__(RolloutEngine)
    engine.tokenizer, engine.system_prompt = tok, None
    texts = {}
    for flag in (None, True, False):
        engine.cfg = RolloutConfig(enable_thinking=flag)
        check_chat_template(tok, engine.cfg, tmp_path)
        texts[flag] = tok.decode(engine.chat_prompt_ids(["2+2?"])[0])
    assert texts[None] == texts[True] and "think" not in texts[True]
    assert texts[False].endswith("<think>\n\n</think>\n\n") and texts[False].startswith(texts[True])
