"""Worker (torchrun): each data-parallel replica's leader owns a vLLM engine serving a tiny model;
the sharded Megatron student is changed and refit; every engine's log-probs must then equal the
student's own. Each replica samples from its own prompt (disjoint shares).

Modes:
  refit     after the refit, vLLM (generation and prompt scoring) == Megatron to --atol; before, not.
  no_reset  a refit without the prefix-cache reset is caught by the trainer-vs-vLLM consistency check.
  bad       update_weights with missing / extra / mis-shaped tensors is refused, engine unchanged.
  fault     MEGATRON_OPD_FAULT is set: the refit fails on every rank, every engine then refuses to
            serve (it holds a mix of old and new layers), and a clean refit afterwards matches.

--engines leader: one engine per data-parallel replica, on its leader (TP rank 0 of stage 0);
          every:  one engine per rank (rollout.tensor_parallel_size=1, the default placement): every
                  rank receives the full weights of its replica.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--mode", default="refit")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--engines", choices=["leader", "every"], default="leader")
    ap.add_argument("--engine-tp", type=int, default=1, help="TP of each engine (its workers on the "
                    "devices of the owner's next ranks)")
    ap.add_argument("--bucket-mb", type=float, default=1)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_opd import parallel
    from megatron_opd.config import RolloutConfig
    from megatron_opd.logprobs import vocab_parallel_token_logprobs
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.batching import ForwardBatch
    from megatron_opd.models.forward import run_micro_batches
    from megatron_opd.models.hf_mapping import HFCheckpoint, export_hf_weights, load_hf_into_megatron
    from megatron_opd.rollout.engine import RolloutEngine, RolloutEngineError
    from megatron_opd.objectives.policy_loss import logprob_gap
    from megatron_opd.rollout.refit import RefitError, refit, update_weights
    from megatron_opd.models.hf_mapping import is_replica_leader

    pcfg = parallel.ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                   expert_model_parallel_size=args.ep)
    parallel.initialize(pcfg)
    rank0 = dist.get_rank() == 0
    ckpt = HFCheckpoint(args.ckpt)
    spec = ckpt.spec()
    model = build_gpt_model(spec, pcfg, role="teacher")
    load_hf_into_megatron(model, spec, ckpt)
    rank, world = dist.get_rank(), dist.get_world_size()
    leader = is_replica_leader() or args.engines == "every"  # this rank owns an engine
    engine = RolloutEngine(RolloutConfig(max_new_tokens=16, max_model_len=512), args.ckpt, seed=0,
                           devices=tuple(range(rank, rank + args.engine_tp)), world_size=world) if leader else None
    owners = [None] * world
    dist.all_gather_object(owners, rank if leader else None)
    receivers = {r for r in owners if r is not None}
    replica, replicas = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mp_group = ps.get_model_parallel_group()
    mp_src = min(dist.get_process_group_ranks(mp_group))

    replica_owners = sorted(r for r in receivers if r in dist.get_process_group_ranks(mp_group))

    def from_owner(obj, owner):
        box = [obj]
        dist.broadcast_object_list(box, src=owner, group=mp_group)
        return box[0]

    # This replica's prompt (its share), longer than one KV block, so vLLM's prefix cache holds it.
    prompt = [(i * 37 + 11 * replica) % (spec.vocab_size - 10) + 3 for i in range(300)]
    result = {"mode": args.mode, "replicas": replicas, "engines": len(receivers)}

    def world_max(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def megatron_logprobs(seq, plen):
        """Student log p of seq[plen:], vocab-parallel over TP; collective, result on every rank. Padded
        at the end to one fixed length (causal: the scored positions do not see it), so that replicas
        sharing an expert-parallel group (EP > 1 spans DP here) run forwards of one shape, as megatron's
        token dispatcher requires."""
        out = []
        n = len(seq)
        seq = list(seq) + [0] * (len(prompt) + 32 - n)

        def fn(mb, logits):
            lp, _ = vocab_parallel_token_logprobs(logits[:, :-1], mb.input_ids[:, 1:],
                                                  tp_group=parallel.tp_group(), valid_vocab_size=spec.vocab_size)
            out.append(lp[0, plen - 1:n - 1])
            return logits.sum() * 0, {}

        run_micro_batches(model, [ForwardBatch(input_ids=torch.tensor([seq]), mask=torch.ones(1, len(seq) - 1))], fn,
                          forward_only=True)
        if args.pp == 1:
            return out[0]
        group = ps.get_pipeline_model_parallel_group()  # the last stage holds the log-probs
        box = [out[0] if out else None]
        dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[-1], group=group)
        return box[0]

    def rollout_and_score(seed):
        """Every engine samples a continuation of its replica's prompt; the replica scores each with
        Megatron; returns the largest gap over all engines."""
        worst = 0.0
        for owner in replica_owners:
            box = None
            if rank == owner:
                s = engine.generate([prompt], n=1, seed=seed).samples[0]
                assert s.prompt_ids == prompt
                box = (s.response_ids, s.response_logprobs)
            resp, vlp = from_owner(box, owner)
            mlp = megatron_logprobs(prompt + resp, len(prompt))
            worst = max(worst, logprob_gap(mlp, torch.tensor(vlp), torch.ones(len(resp)))["mismatch/max_abs"])
        return world_max(worst)

    def engine_scores(seq):
        """Every engine's prompt scores of seq (checked equal across a replica's engines)."""
        scores = [from_owner(engine.score([seq], [len(prompt)])[0] if rank == o else None, o)
                  for o in replica_owners]
        assert all(s == scores[0] for s in scores), "a replica's engines disagree"
        return scores[0]

    def engines_refuse(seq) -> bool:
        refused = True
        if leader:
            try:
                engine.score([seq], [len(prompt)])
                refused = False
            except RolloutEngineError as exc:
                refused = "did not complete" in str(exc)
        return world_max(0.0 if refused else 1.0) == 0.0

    def perturb():
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1)  # layout-independent change of every tensor

    if args.mode == "refit":
        result["gap_initial"] = rollout_and_score(1)
        perturb()
        result["gap_stale"] = rollout_and_score(2)
        refit(engine, model, spec, bucket_mb=args.bucket_mb, receivers=receivers)
        result["gap_after_refit"] = rollout_and_score(3)
        seq = prompt + [5, 6, 7, 8]
        scored = engine_scores(seq)
        result["score_gap_after_refit"] = world_max(
            (megatron_logprobs(seq, len(prompt)) - torch.tensor(scored)).abs().max().item())
        assert result["gap_initial"] <= args.atol, result
        assert result["gap_stale"] > 0.05, result  # the test can fail: the change is visible
        assert result["gap_after_refit"] <= args.atol and result["score_gap_after_refit"] <= args.atol, result
    elif args.mode == "no_reset":
        rollout_and_score(1)  # vLLM caches the prompt's KV blocks
        perturb()
        refit(engine, model, spec, bucket_mb=args.bucket_mb, receivers=receivers, reset_cache=False)
        result["gap_without_reset"] = rollout_and_score(4)
        if leader:
            engine.reset_prefix_cache()
        result["gap_after_reset"] = rollout_and_score(4)
        assert result["gap_without_reset"] > 10 * args.atol, result  # caught by the check
        assert result["gap_after_reset"] <= args.atol, result
    elif args.mode == "bad":
        full = []
        for bucket in export_hf_weights(model, spec):
            full += bucket
        if rank0:
            before = engine.score([prompt + [5, 6]], [len(prompt)])[0]
            perturbed = [(n, t * 2.0) for n, t in full]
            cases = {
                "missing": perturbed[1:],
                "extra": perturbed + [("model.layers.99.mlp.up_proj.weight", full[1][1])],
                "misshaped": [(n, t[:-1] if "q_proj" in n else t) for n, t in perturbed],
            }
            for name, tensors in cases.items():
                try:
                    update_weights(engine, tensors)
                except RefitError as exc:
                    result[name] = str(exc)[:120]
                else:
                    raise AssertionError(f"{name}: refit was not refused")
            after = engine.score([prompt + [5, 6]], [len(prompt)])[0]
            assert before == after, "a refused refit changed the engine"
    elif args.mode == "fault":
        import time

        seq = prompt + [5, 6, 7, 8]
        engine_scores(seq)
        perturb()
        t0 = time.time()
        try:
            refit(engine, model, spec, bucket_mb=args.bucket_mb, receivers=receivers)
        except RefitError as exc:
            result["error"] = str(exc)[:300]
        else:
            raise AssertionError("the injected fault did not fail the refit")
        result["seconds_to_fail"] = world_max(time.time() - t0)
        result["refused"] = engines_refuse(seq)
        os.environ.pop("MEGATRON_OPD_FAULT")
        refit(engine, model, spec, bucket_mb=args.bucket_mb, receivers=receivers)
        result["gap_after_clean_refit"] = rollout_and_score(3)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, result.get("error"))
    result["errors_on_ranks"] = sum(e is not None for e in errors)
    if rank0:
        print(json.dumps(result), flush=True)
    if engine is not None:
        engine.shutdown()
    parallel.destroy()


if __name__ == "__main__":
    main()
