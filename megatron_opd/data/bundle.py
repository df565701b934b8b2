"""Everything the trainer needs from data: training prompts, the verifier, held-out evaluation."""

from __future__ import annotations

from functools import partial

from megatron_opd.data.dataset import PromptDataset, load_records
from megatron_opd.data.synthetic import make_samples
from megatron_opd.rewards.evaluation import avg_at_k
from megatron_opd.rewards.synthetic import boxed_match_reward


class DataBundle:
    """Built identically on every rank from the config (so every rank draws the same prompts)."""

    def __init__(self, cfg, tokenizer_dir):
        from transformers import AutoTokenizer

        d = cfg.data
        if d.synthetic:
            train = make_samples(d.synthetic, d.synthetic_train_size, seed=cfg.train.seed, digits=d.synthetic_digits)
            held_out = make_samples(d.synthetic, d.synthetic_eval_size, seed=cfg.train.seed + 99_991,
                                    digits=d.synthetic_digits)
            self._math_verifier = None
        else:
            keys = dict(prompt_key=d.prompt_key, answer_key=d.answer_key, domain_key=d.domain_key,
                        default_domain=d.default_domain)
            train = load_records(d.train_path, **keys)
            held_out = load_records(d.eval_path, **keys) if d.eval_path else train[: d.synthetic_eval_size]
            from megatron_opd.rewards.math_verify_pool import MathVerifier

            self._math_verifier = MathVerifier()
        self.train = PromptDataset(train, seed=cfg.train.seed)
        self.held_out = held_out
        self.teacher_domains = [t.domain for t in cfg.teachers]
        self.seed = cfg.train.seed
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def score(self, responses: list[str], answers: list[str]) -> list[float]:
        if self._math_verifier is None:
            return [boxed_match_reward(r, a) for r, a in zip(responses, answers)]
        return self._math_verifier.score(responses, answers)

    def verify(self, result, samples) -> list[float]:
        """Outcome reward of every response of a RolloutBatch (metrics; OPD itself needs none)."""
        return self.score([s.text for s in result.samples],
                          [samples[s.prompt_index]["answer"] for s in result.samples])

    def evaluate(self, engine, k: int) -> dict:
        """Held-out avg@k with the engine's current weights (fixed seed: comparable across steps)."""
        result = engine.generate([s["prompt"] for s in self.held_out], n=k, seed=self.seed + 7)
        responses = [[] for _ in self.held_out]
        lengths = [[] for _ in self.held_out]
        for s in result.samples:
            responses[s.prompt_index].append(s.text)
            lengths[s.prompt_index].append(s.length)
        return avg_at_k(responses, [s["answer"] for s in self.held_out],
                        lambda r, a: self.score([r], [a])[0], lengths)
