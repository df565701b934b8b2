"""A small tokenizer trained locally (no hub downloads on these machines), for tiny test/demo models.

Qwen-like: digits are single tokens (so arithmetic is learnable), ChatML special tokens and chat
template, saved with `save_pretrained` so transformers and vLLM both load it from the directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen's ChatML template, minus tool calling.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_ENGLISH = (
    "Compute the following and put the final answer in a box. Solve step by step. The answer is "
    "Reverse the string. Sort the list of numbers. Add the numbers, carry the one, write the sum. "
    "You are a helpful assistant. Question answer user system assistant think reason therefore so "
)


def default_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Synthetic task texts plus a little English, enough to learn a small BPE vocabulary."""
    from megatron_opd.data.synthetic import ArithmeticTask, StringTask

    texts = [_ENGLISH] * 20
    for task in (ArithmeticTask(digits=2), ArithmeticTask(digits=3, ops="+-*"), StringTask()):
        for s in task.samples(n // 3, seed=seed):
            texts.append(s["prompt"])
            texts.append(task.solution(s))
    return texts


def train_tokenizer(output_dir: str | Path, texts: Optional[Iterable[str]] = None, vocab_size: int = 384):
    """Train (or load, if already saved in `output_dir`) the tokenizer; returns a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    output_dir = Path(output_dir)
    if (output_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(output_dir))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts) if texts is not None else default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    output_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(output_dir))
    return PreTrainedTokenizerFast.from_pretrained(str(output_dir))
