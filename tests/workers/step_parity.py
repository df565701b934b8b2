"""Worker (torchrun): one OPD step's scoring and update, computed several ways on the same rollout
batch, without a rollout engine. Prints one JSON line (rank 0) with the largest relative differences
over all ranks:

- fused vs logits: the response-only fused LM head against megatron's materialised logits
  (teacher log-probs, the loss and every gradient);
- token budgets: the same step cut into fixed 4-row micro-batches and into token-budget micro-batches
  of two different budgets (loss and gradients must not depend on the cut);
- routing (with two teachers): each teacher scoring only its own samples against every teacher scoring
  every sample and selecting, with the number of sequences each pushed through the teachers.

The optimizer step is replaced by a capture of the gradient buffers, so nothing moves between runs.
"""

import argparse
import json


class NoEngine:  # the batch is made by synthetic_generate; nothing is generated or refit
    def sleep(self, *a): pass
    def wake_up(self, *a): pass
    def shutdown(self): pass


def synthetic_generate(self, samples, first_index, step=0):
    """ColocatedRollout.sample stand-in: prompts and responses of varied lengths, keyed by the global
    prompt index (so every layout sees the same batch)."""
    import torch

    from megatron_opd.rollout.engine import RolloutBatch, RolloutSample

    batch = RolloutBatch()
    for j in range(len(samples)):
        for k in range(self.cfg.rollout.n):
            g = torch.Generator().manual_seed((first_index + j) * 31 + k)
            p = 3 + int(torch.randint(0, 12, (1,), generator=g))
            r = 1 + int(torch.randint(0, self.cfg.rollout.max_new_tokens, (1,), generator=g))
            ids = torch.randint(3, self.spec.vocab_size, (p + r,), generator=g).tolist()
            batch.samples.append(RolloutSample(
                prompt_index=j, prompt_ids=ids[:p], response_ids=ids[p:],
                response_logprobs=(-1.0 - torch.rand(r, generator=g)).tolist(),
                finish_reason="length", text=""))
    return batch


def engine_free_trainer(config, overrides):
    """An OPDTrainer set up without a rollout engine (rollouts from `synthetic_generate`), whose
    optimizer step only captures the gradient buffers (`captured["grads"]`), so nothing moves between
    runs of a step on one batch. Returns (trainer, captured)."""
    import torch

    from megatron_opd import trainer as trainer_mod
    from megatron_opd.config import load_config

    from megatron_opd.rollout import colocated

    colocated.build_engine = lambda *a, **k: NoEngine()
    colocated.ColocatedRollout.sample = synthetic_generate
    tr = trainer_mod.OPDTrainer(load_config(config, overrides))
    tr.setup()
    captured = {}

    def capture_step():
        captured["grads"] = torch.cat([b.grad_data.float().clone() for b in tr.student.buffers])
        return True, 0.0, None

    tr.optimizer.step = capture_step
    tr.scheduler.step = lambda n: None
    return tr, captured


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    tr, captured = engine_free_trainer(args.config, args.overrides)
    cfg = tr.cfg
    try:
        batch, _ = tr.rollout()

        def run(impl, budget, route=True):
            tr.logprob_impl, cfg.train.max_tokens_per_micro_batch = impl, budget
            micro = tr.micro_batches(batch)
            span = tr.experts_span_replicas
            tr.experts_span_replicas = not route  # routing is off where expert groups span replicas
            micro, _ = tr.score(micro)
            tr.experts_span_replicas = span
            metrics = tr.update(micro)
            teacher = [mb.teacher_logprobs for mb in micro]
            return {"loss": metrics.get("loss"), "grads": captured["grads"], "teacher": teacher,
                    "sequences": tr.teacher_sequences, "micro": len(micro)}

        def rel(a, b):
            return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

        def teacher_rel(a, b):
            if a["teacher"][0] is None:  # not the last pipeline stage
                return 0.0
            return max(rel(x, y) for x, y in zip(a["teacher"], b["teacher"]))

        tokens = int(cfg.rollout.max_model_len)
        base = run("fused", None)
        logits = run("logits", None)
        small = run("fused", tokens)
        large = run("fused", 3 * tokens)
        unrouted = run("fused", None, route=False)
        out = {
            "fused_vs_logits_grad": rel(base["grads"], logits["grads"]),
            "fused_vs_logits_teacher": teacher_rel(base, logits),
            "budget_small_vs_fixed_grad": rel(small["grads"], base["grads"]),
            "budget_large_vs_fixed_grad": rel(large["grads"], base["grads"]),
            "routed_vs_all_teacher": teacher_rel(base, unrouted),
            "routed_vs_all_grad": rel(base["grads"], unrouted["grads"]),
            "grad_max": base["grads"].abs().max().item(),
        }
        t = torch.tensor(list(out.values()), dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = dict(zip(out, t.tolist()))
        losses = {k: r["loss"] for k, r in [("fixed", base), ("logits", logits), ("small", small),
                                            ("large", large), ("unrouted", unrouted)]}
        out.update({"loss": losses, "sequences_routed": base["sequences"],
                    "sequences_unrouted": unrouted["sequences"], "rows": int(batch.input_ids.shape[0]),
                    "micro": {"fixed": base["micro"], "small": small["micro"], "large": large["micro"]},
                    "teacher_index": batch.teacher_index.tolist()})
        if dist.get_rank() == 0:
            print(json.dumps({"step_parity": out}), flush=True)
    finally:
        tr.cleanup()


if __name__ == "__main__":
    main()
