"""Worker: RolloutEngine.generate() semantics and start-up errors (one process, in-process engine)."""

import argparse
import json
import math

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--bad-arch", required=True)
    args = ap.parse_args()
    from megatron_opd.config import RolloutConfig
    from megatron_opd.rollout.engine import RolloutEngine, RolloutEngineError

    errors = {}
    for name, path in (("missing", "/nonexistent/model"), ("arch", args.bad_arch)):
        try:
            RolloutEngine(RolloutConfig(), path)
        except RolloutEngineError as exc:
            errors[name] = str(exc)
    cfg = RolloutConfig(max_new_tokens=6, max_model_len=128, n=3)
    engine = RolloutEngine(cfg, args.ckpt, seed=0)
    prompts = ["Compute 12+30.", "Compute 7+8."]
    a = engine.generate(prompts, seed=11)
    b = engine.generate(prompts, seed=11)
    assert len(a) == 6 and [s.prompt_index for s in a.samples] == [0, 0, 0, 1, 1, 1]
    assert [s.response_ids for s in a.samples] == [s.response_ids for s in b.samples], "seeded not reproducible"
    for s in a.samples:
        assert 1 <= s.length <= 6 and len(s.response_logprobs) == s.length
        assert all(math.isfinite(x) and x <= 0 for x in s.response_logprobs)
        assert s.finish_reason in ("length", "stop")
        assert (s.finish_reason == "length") == (s.length == 6 and s.response_ids[-1] != engine.tokenizer.eos_token_id)
    t = a.to_padded(pad_id=engine.tokenizer.pad_token_id)
    s0 = a.samples[0]
    p = len(s0.prompt_ids)
    # position p-1 predicts the first response token
    assert t["input_ids"][0, p].item() == s0.response_ids[0]
    assert t["response_mask"][0].sum().item() == s0.length and t["response_mask"][0, p - 1] == 1
    assert t["response_mask"][0, p - 2] == 0
    assert abs(t["rollout_logprobs"][0, p - 1].item() - s0.response_logprobs[0]) < 1e-6
    # The sleep state machine, on this real engine: a sleeping engine refuses to generate, score or
    # refit (vLLM's own sleep call runs only on CUDA; the state is tracked everywhere).
    refused = {}

    def refuses(name, fn):
        try:
            fn()
        except RolloutEngineError as exc:
            refused[name] = str(exc)
            return True
        return False

    engine.sleep()
    assert refuses("sleep_twice", engine.sleep)
    assert refuses("generate_asleep", lambda: engine.generate(prompts, seed=11))
    assert refuses("score_asleep", lambda: engine.score([a.samples[0].prompt_ids + [5]], [p]))
    assert refuses("refit_asleep", lambda: engine.begin_refit(1024))
    engine.wake_up(["weights"])
    assert engine.asleep == {"kv_cache"}
    assert refuses("generate_without_kv_cache", lambda: engine.generate(prompts, seed=11))
    try:
        engine.wake_up(["kv"])
        raise AssertionError("an unknown wake-up tag was accepted")
    except ValueError as exc:
        refused["unknown_tag"] = str(exc)
    engine.wake_up()
    c = engine.generate(prompts, seed=11)  # awake again: serves, the same seeded samples
    assert [s.response_ids for s in c.samples] == [s.response_ids for s in a.samples]
    # a refit that does not complete leaves a mix of old and new layers: the engine stops serving
    engine.begin_refit(1024, buckets=1)
    engine.end_refit(complete=False)
    assert refuses("generate_after_incomplete_refit", lambda: engine.generate(prompts, seed=11))
    engine.shutdown()
    print(json.dumps({"errors": errors, "refused": refused}), flush=True)


if __name__ == "__main__":
    main()
