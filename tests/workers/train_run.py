"""Worker (torchrun): run the OPD trainer on a recipe, optionally with an injected fault.

--inject-nan-step N   the objective returns a NaN loss at step N (the step must be skipped and counted)
--inject-nan-rank R   ... only on global rank R (default: every rank)
--nan-logprobs-step N the student's log-probs in the update of step N are NaN (a diverged student; with
                      --inject-nan-rank only on that rank: its metrics then carry only "nonfinite")
--crash-save-step N   the checkpoint save of step N dies half-way (previous checkpoint must survive)
--fixed-rollout       every engine returns a fixed batch instead of sampling: each prompt's responses
                      depend only on its global index and the step, so runs of any layout (TP/PP/DP)
                      train on identical samples and can be compared exactly
--dump-weights PATH   after training, save the student's HF-named weights to PATH (torch.save)
--dump-samples PATH   rank 0 writes every step's replica samples as the loop collects them (prompt ids,
                      response ids, rollout log-probs) and every held-out evaluation's metrics to PATH
                      (json)
--record-calls        record what the last step did to the engine, the models and their memory, as the
                      calls themselves (RolloutEngine.generate / sleep / wake_up / begin_refit /
                      end_refit, platform.onload / offload, each model's forward passes), not the
                      trainer's own phase names; printed as "calls"
"""

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--inject-nan-step", type=int, default=None)
    ap.add_argument("--inject-nan-rank", type=int, default=None)
    ap.add_argument("--nan-logprobs-step", type=int, default=None)
    ap.add_argument("--crash-save-step", type=int, default=None)
    ap.add_argument("--fixed-rollout", action="store_true")
    ap.add_argument("--dump-weights", default=None)
    ap.add_argument("--dump-samples", default=None)
    ap.add_argument("--record-calls", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    from megatron_opd import checkpoint, loss
    from megatron_opd.config import load_config
    from megatron_opd.trainer import OPDTrainer

    if args.inject_nan_step is not None:
        real = loss.objective_loss

        def nan_at_step(objective, mb, out, step):
            import torch.distributed as dist

            value, metrics = real(objective, mb, out, step)
            here = args.inject_nan_rank is None or dist.get_rank() == args.inject_nan_rank
            return (value * float("nan") if step == args.inject_nan_step and here else value), metrics

        loss.objective_loss = nan_at_step
    if args.nan_logprobs_step is not None:
        import torch.distributed as dist

        from megatron_opd.models import forward as lp_mod

        real_lp, real_update, now = lp_mod.response_logprobs, OPDTrainer.update, {}

        def update(self, micro):
            now["step"] = self.step
            return real_update(self, micro)

        def nan_lp(*a, **k):
            lp, ent = real_lp(*a, **k)
            here = args.inject_nan_rank is None or dist.get_rank() == args.inject_nan_rank
            if torch.is_grad_enabled() and now.get("step") == args.nan_logprobs_step and here:
                lp = lp * float("nan")
            return lp, ent

        OPDTrainer.update, lp_mod.response_logprobs = update, nan_lp
    if args.crash_save_step is not None:
        from megatron.core import dist_checkpointing

        real_save = dist_checkpointing.save

        def crashing_save(state, path, *a, **k):
            if path.endswith(f"step_{args.crash_save_step}.tmp"):
                real_save(state, path, *a, **k)  # files half-written...
                raise OSError("injected crash while saving")  # ...then the node dies
            return real_save(state, path, *a, **k)

        dist_checkpointing.save = crashing_save

    if args.fixed_rollout:
        from megatron_opd.rollout.colocated import ColocatedRollout

        ColocatedRollout.sample = fixed_sample

    record = {"samples": [], "evals": []}
    if args.dump_samples:
        from megatron_opd.rollout.colocated import ColocatedRollout
        from megatron_opd.rollout.dedicated import DedicatedRollout

        for cls in (ColocatedRollout, DedicatedRollout):
            def wrapped(real_collect, real_eval):
                def collect(self, step):
                    out = real_collect(self, step)
                    record["samples"].append([(s.prompt_ids, s.response_ids, s.response_logprobs)
                                              for s in out.batch.samples])
                    return out

                def evaluate(self, data, k):
                    metrics = real_eval(self, data, k)
                    record["evals"].append(metrics)
                    return metrics

                return collect, evaluate

            cls.collect, cls.evaluate = wrapped(cls.collect, cls.evaluate)

    calls: list = []
    cfg = load_config(args.config, args.overrides)
    from megatron_opd import parallel
    from megatron_opd.rollout.dedicated import is_engine_rank, serve_engine

    if is_engine_rank(cfg, parallel.launched_rank(), parallel.launched_world_size()):
        sys.exit(serve_engine(cfg))  # rollout.placement=dedicated: an engine-only rank
    trainer = OPDTrainer(cfg)
    if args.record_calls:
        record_calls(trainer, calls)
    try:
        trainer.setup()
        trainer.train()
        if args.dump_weights:
            dump_weights(trainer, args.dump_weights)
        if args.dump_samples and trainer.rank0:
            with open(args.dump_samples, "w") as f:
                json.dump(record, f)
        if trainer.rank0:
            print(json.dumps({"step": trainer.step, "skipped_steps": trainer.skipped_steps,
                              "phases": trainer.phases, "calls": calls,
                              "engine_asleep": trainer.engines.asleep}),
                  flush=True)
    finally:
        trainer.cleanup()


def record_calls(trainer, calls: list) -> None:
    """Wrap the engine's, platform's and models' entry points so that each call appends its name to
    `calls` (cleared at every step's rollout: what is left is the last step and its evaluation)."""
    from megatron_opd import platform
    from megatron_opd.models import forward
    from megatron_opd.rollout.colocated import ColocatedRollout
    from megatron_opd.rollout.engine import RolloutEngine

    def role(model):  # (the set-up's own offloads run before the trainer holds its models)
        student = getattr(trainer, "student", None)
        if student is not None and (model is student or getattr(model, "module", None) is student):
            return "student"
        if model is getattr(trainer, "reference", None):
            return "reference"
        return next((f"teachers[{i}]" for i, t in enumerate(getattr(trainer, "teachers", [])) if t is model),
                    "a model being built")

    def wrap(owner, name, label):
        real = getattr(owner, name)

        def recorded(*a, **k):
            entry = label(*a, **k)
            if entry == "generate":
                calls.clear()
            calls.append(entry)
            return real(*a, **k)

        setattr(owner, name, recorded)

    wrap(ColocatedRollout, "generate", lambda self, *a, **k: "generate")  # the step's rollout
    wrap(RolloutEngine, "sleep", lambda self: "engine.sleep")
    wrap(RolloutEngine, "wake_up", lambda self, tags=RolloutEngine.SLEEP_TAGS: f"engine.wake_up{sorted(tags)}")
    wrap(RolloutEngine, "begin_refit", lambda self, *a, **k: "engine.begin_refit")
    wrap(RolloutEngine, "end_refit", lambda self, complete: f"engine.end_refit(complete={complete})")
    wrap(platform, "onload", lambda module: f"onload:{role(module)}")
    wrap(platform, "offload", lambda module: f"offload:{role(module)}")
    wrap(forward, "run_micro_batches",
         lambda model, micro, fn, forward_only, output="logits":
         f"{'forward' if forward_only else 'train'}:{role(model)}")


def fixed_sample(self, samples, first_index, step):
    """ColocatedRollout.sample replaced: a deterministic batch keyed by (global prompt index, sample,
    step), produced by whichever engine serves the prompt."""
    import torch

    from megatron_opd.rollout.engine import RolloutBatch, RolloutSample

    n, vocab = self.cfg.rollout.n, self.spec.vocab_size
    batch = RolloutBatch()
    for j, ids in enumerate(self.engine.chat_prompt_ids([s["prompt"] for s in samples])):
        for k in range(n):
            g = torch.Generator().manual_seed(((first_index + j) * 97 + k) * 1009 + step)
            length = 2 + int(torch.randint(0, self.cfg.rollout.max_new_tokens - 1, (1,), generator=g))
            tokens = torch.randint(3, vocab, (length,), generator=g).tolist()
            logprobs = (-1.0 - torch.rand(length, generator=g)).tolist()
            batch.samples.append(RolloutSample(prompt_index=j, prompt_ids=ids, response_ids=tokens,
                                               response_logprobs=logprobs, finish_reason="length", text=""))
    return batch


def dump_weights(trainer, path):
    import torch
    import torch.distributed as dist

    from megatron_opd.models.hf_mapping import export_hf_weights

    tensors = {}
    for bucket in export_hf_weights(trainer.student.module, trainer.spec):
        tensors.update({n: t.clone() for n, t in bucket})
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(tensors, path)


if __name__ == "__main__":
    main()
