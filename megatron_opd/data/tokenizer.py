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

# A Llama-3-like family for cross-tokenizer tests and studies: other special tokens, another chat
# template, another vocabulary size (styles "llama" and "llama_digits", `train_tokenizer`).
LLAMA_SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TOKENIZER_STYLES = ("qwen", "llama", "llama_digits")  # llama_digits: the llama family, one token per digit

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


def train_tokenizer(output_dir: str | Path, texts: Optional[Iterable[str]] = None, vocab_size: Optional[int] = None,
                    style: str = "qwen"):
    """Train (or load, if already saved in `output_dir`) a byte-level BPE tokenizer; returns a
    PreTrainedTokenizerFast. `style`: "qwen" (ChatML, one token per digit, 384 tokens by default),
    "llama" (Llama-3-like header tokens and template, numbers merged, 640 tokens by default) or
    "llama_digits" (the same specials and template, one token per digit, merges across spaces and
    punctuation: a small model learns addition from it as fast as from "qwen", and its tokens still span
    several of the student's — with merged numbers the demo's 1000-step teacher reached 0.19 held-out
    accuracy)."""
    from transformers import PreTrainedTokenizerFast

    output_dir = Path(output_dir)
    if (output_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(output_dir))
    if style not in TOKENIZER_STYLES:
        raise ValueError(f"tokenizer style {style!r}: use one of {TOKENIZER_STYLES}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    llama = style.startswith("llama")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # llama_digits: no word-boundary regex, so merges cross spaces and punctuation (". \\boxed{" is one token)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "llama_digits")
    tok.pre_tokenizer = byte_level if style == "llama" else pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size or (640 if llama else 384), special_tokens=LLAMA_SPECIAL_TOKENS if llama else SPECIAL_TOKENS,
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts) if texts is not None else default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eot_id|>" if llama else "<|im_end|>",
        pad_token="<|end_of_text|>" if llama else "<|endoftext|>", bos_token=None, unk_token=None,
        model_max_length=4096,
    )
    fast.chat_template = LLAMA_CHAT_TEMPLATE if llama else CHAT_TEMPLATE
    output_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(output_dir))
    return PreTrainedTokenizerFast.from_pretrained(str(output_dir))
