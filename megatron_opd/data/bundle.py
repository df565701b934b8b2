"""Everything the trainer needs from data: training prompts, the verifier, held-out evaluation."""

from __future__ import annotations

from functools import partial
from typing import Optional

from megatron_opd.data.dataset import PromptDataset, has_system_message, load_records
from megatron_opd.data.synthetic import make_samples
from megatron_opd.rewards.evaluation import metrics_at_k
from megatron_opd.rewards.synthetic import boxed_match_reward


def check_domains(records: list[dict], teacher_domains: list, source: str) -> None:
    """With several teachers every training prompt's domain must name one (checked before any model
    starts; a single teacher scores every domain)."""
    if len(teacher_domains) < 2:
        return
    unknown = sorted({r["domain"] for r in records} - set(teacher_domains))
    if unknown:
        count = sum(r["domain"] in unknown for r in records)
        raise ValueError(
            f"{source}: {count} prompt(s) have domain(s) {unknown} that no teacher serves (teachers[*].domain: "
            f"{teacher_domains}); add a teacher for them, fix the data's domain field (data.domain_key), or set "
            "data.default_domain for prompts without one")


def check_no_system_messages(records: list[dict]) -> None:
    """data.system_prompt and a prompt's own system message cannot both apply: refuse rather than pick."""
    own = sum(has_system_message(r["prompt"]) for r in records)
    if own:
        raise ValueError(f"data.system_prompt is set but {own} prompt(s) carry their own system message; remove "
                         "data.system_prompt (their messages are used as they are) or the system messages")


class DataBundle:
    """Built identically on every rank from the config (so every rank draws the same prompts)."""

    def __init__(self, cfg, tokenizer_dir):
        from transformers import AutoTokenizer

        d = cfg.data
        if d.synthetic:
            seed = cfg.train.seed if d.synthetic_seed is None else d.synthetic_seed
            held_out = make_samples(d.synthetic, d.synthetic_eval_size, seed=seed + 99_991,
                                    digits=d.synthetic_digits)
            # held out means never trained on: a drawn training prompt equal to a held-out one is dropped
            held_prompts = {s["prompt"] for s in held_out}
            train = [s for s in make_samples(d.synthetic, d.synthetic_train_size, seed=seed,
                                             digits=d.synthetic_digits) if s["prompt"] not in held_prompts]
            self._math_verifier = None
        else:
            keys = dict(prompt_key=d.prompt_key, answer_key=d.answer_key, domain_key=d.domain_key,
                        default_domain=d.default_domain)
            train = load_records(d.train_path, **keys)
            if d.eval_path:
                held_out = load_records(d.eval_path, **keys)
            else:  # carved out of the training file: never trained on
                if d.eval_holdout >= len(train):
                    raise ValueError(f"data.eval_holdout={d.eval_holdout} leaves no training prompts in "
                                     f"{d.train_path} ({len(train)} records); lower it or set data.eval_path")
                train, held_out = train[:-d.eval_holdout], train[-d.eval_holdout:]
            from megatron_opd.rewards.math_verify_pool import MathVerifier

            self._math_verifier = MathVerifier()
            if d.system_prompt is not None:
                check_no_system_messages(train + held_out)
        self.teacher_domains = [t.domain for t in cfg.teachers]
        source = "data.synthetic" if d.synthetic else "data.train_path"
        check_domains(train, self.teacher_domains, source)
        self.train = PromptDataset(train, seed=cfg.train.seed, source=source)
        if not held_out:
            raise ValueError(f"{d.eval_path if d.eval_path else 'the held-out set'} has no prompts: held-out "
                             "evaluation needs at least one (data.eval_path / data.eval_holdout / "
                             "data.synthetic_eval_size)")
        self.held_out = held_out
        self.seed = cfg.train.seed
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        from megatron_opd.rollout.engine import check_prompt_lengths

        check_prompt_lengths(tok, [s["prompt"] for s in train], cfg.rollout, source, d.system_prompt)
        check_prompt_lengths(tok, [s["prompt"] for s in held_out], cfg.rollout,
                             "data.eval_path" if d.eval_path else "held-out prompts", d.system_prompt)

    def score(self, responses: list[str], answers: list[str]) -> list[float]:
        if self._math_verifier is None:
            return [boxed_match_reward(r, a) for r, a in zip(responses, answers)]
        return self._math_verifier.score(responses, answers)

    def verify(self, result, samples) -> list[float]:
        """Outcome reward of every response of a RolloutBatch (metrics; OPD itself needs none)."""
        return self.score([s.text for s in result.samples],
                          [samples[s.prompt_index]["answer"] for s in result.samples])

    def evaluate_share(self, engine, k: int, lo: int = 0, hi: Optional[int] = None) -> tuple[list, list, list]:
        """k rewards, k lengths and the domain of each held-out prompt in [lo, hi), with the engine's
        current weights (fixed per-prompt seeds: comparable across steps and across data-parallel sizes)."""
        prompts = self.held_out[lo:hi]
        if not prompts:
            return [], [], []
        result = engine.generate([s["prompt"] for s in prompts], n=k, seed=self.seed + 7, first_index=lo)
        responses = [[] for _ in prompts]
        lengths = [[] for _ in prompts]
        for s in result.samples:
            responses[s.prompt_index].append(s.text)
            lengths[s.prompt_index].append(s.length)
        answers = [s["answer"] for s in prompts]
        scores = [self.score(rs, [a] * len(rs)) for rs, a in zip(responses, answers)]
        return scores, lengths, [s["domain"] for s in prompts]

    def evaluate(self, engine, k: int) -> dict:
        """Held-out avg@k of all held-out prompts with one engine."""
        return metrics_at_k(*self.evaluate_share(engine, k))
