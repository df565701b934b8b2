"""Worker (torchrun): one OPD step with a teacher of `tokenizer: cross`, through the trainer's own rollout
batch, scoring and update, without a rollout engine (rank 0 prints one JSON line):

- responses are canonical tokenizations of arithmetic text (as a trained model writes them), the prompts
  rendered by the student's chat template, half stopped on the student's end-of-turn, half cut at the cap;
- the teacher's log-prob of each whole response, summed over the student's positions, against
  transformers' own forward of the teacher's HF checkpoint on the text re-rendered with the teacher's
  tokenizer and chat template in this file (float64); with several teachers, each sample's own (routed by
  its domain);
- with --compare-same (a teacher with the student's tokenizer): the same step scored the same-tokenizer
  way (the student's ids as they are); the loss and every gradient must be equal.
"""

import argparse
import json
import random

GENERATED = []  # (prompt text, RolloutSample) of this process's batch


def canonical_generate(self, samples, first_index, step=0):
    """ColocatedRollout.sample stand-in: the chat-templated prompt and a canonical response per sample."""
    from transformers import AutoTokenizer

    from megatron_opd.rollout.engine import RolloutBatch, RolloutSample, chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(self.cfg.student.checkpoint)
    batch = RolloutBatch()
    for j, s in enumerate(samples):
        for k in range(self.cfg.rollout.n):
            rng = random.Random((first_index + j) * 31 + k)
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            text = f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}"
            ids = tok(text, add_special_tokens=False)["input_ids"][:self.cfg.rollout.max_new_tokens - 1]
            stopped = (j + k) % 2 == 0
            ids = ids + [tok.eos_token_id] if stopped else ids
            sample = RolloutSample(
                prompt_index=j, prompt_ids=chat_prompt_ids(tok, [s["prompt"]], self.cfg.rollout)[0],
                response_ids=ids, response_logprobs=[-1.0 - 0.01 * i for i in range(len(ids))],
                finish_reason="stop" if stopped else "length", text="")
            batch.samples.append(sample)
            GENERATED.append((s["prompt"], s["domain"], sample))
    return batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--compare-same", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from megatron_opd.rollout import colocated
    from step_parity import engine_free_trainer

    tr, captured = engine_free_trainer(args.config, args.overrides)
    colocated.ColocatedRollout.sample = canonical_generate  # after engine_free_trainer's own stand-in
    cfg = tr.cfg
    try:
        batch, metrics = tr.rollout()

        def run():
            micro, _ = tr.score(tr.micro_batches(batch))
            out = tr.update(micro)
            return out.get("loss"), captured["grads"].clone(), micro

        loss, grads, micro = run()
        result = {"loss": loss, "metrics": {k: v for k, v in metrics.items() if k.startswith("cross/")}}
        if args.compare_same:
            cross, tr.cross = tr.cross, [None] * len(tr.cross)
            loss_same, grads_same, _ = run()
            tr.cross = cross
            t = torch.tensor([(grads - grads_same).abs().max().item()], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            result.update({"loss_same": loss_same, "grad_diff": t.item(), "grad_max": grads.abs().max().item()})
        if dist.get_rank() == 0 and micro[0].teacher_logprobs is not None:  # last stage (PP = 1 here)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            ours = []
            for mb in micro:
                ours += (mb.teacher_logprobs.double() * mb.mask).sum(1).tolist()
            student_tok = AutoTokenizer.from_pretrained(cfg.student.checkpoint)
            by_domain = {t.domain: t.checkpoint for t in cfg.teachers}  # one teacher: {None: its path}
            loaded = {path: (AutoTokenizer.from_pretrained(path),
                             AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32))
                      for path in by_domain.values()}
            rows = []
            for prompt, domain, s in GENERATED:
                teacher_tok, model = loaded[by_domain[domain] if len(by_domain) > 1 else cfg.teachers[0].checkpoint]
                stopped = s.finish_reason == "stop"
                text = student_tok.decode(s.response_ids[:-1] if stopped else s.response_ids)
                rendered = teacher_tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                           add_generation_prompt=True, tokenize=False)
                p_ids = teacher_tok(rendered, add_special_tokens=False)["input_ids"]
                r_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p_ids + r_ids + ([teacher_tok.eos_token_id] if stopped else [])])
                with torch.no_grad():
                    lp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)  # [S-1, V]
                rows.append(lp.gather(1, ids[0, 1:, None])[len(p_ids) - 1:, 0].sum().item())
            # micro-batches may order rows differently: compare the sorted per-sequence values
            result.update({"teacher_seq_logprob": sorted(ours), "teacher_seq_logprob_hf": sorted(rows),
                           "domains": [d for _, d, _ in GENERATED]})
        if dist.get_rank() == 0:
            print(json.dumps({"cross_step": result}), flush=True)
    finally:
        tr.cleanup()


if __name__ == "__main__":
    main()
