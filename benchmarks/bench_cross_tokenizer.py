"""Host cost of the cross-tokenizer path (teachers[i].tokenizer: cross) at production response lengths:
re-rendering and re-tokenizing a step's samples for the teacher and aligning the two tokenizations
(`CrossTokenizer.view`), against the teacher tokenizer's own batched encoding of the same texts (the
least any re-tokenization must do), measured in the same run.

    .venv/bin/python benchmarks/bench_cross_tokenizer.py [--samples 256] [--tokens 2048]

The student tokenizer is the demo's (qwen-style, one token per digit), the teacher's the Llama-3-style
one trained here (numbers merged: multi-token spans). Responses are canonical tokenizations of worked
arithmetic text, `--tokens` student tokens each. Prints `name: value` lines, among them
`cross_view_ms_per_sample`, `teacher_tokens_per_student_token` and
`cross_view_time_ratio_vs_teacher_encode` (views over the plain batched encode).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()

    from megatron_opd.cross_tokenizer import CrossTokenizer
    from megatron_opd.data.tokenizer import train_tokenizer

    student = train_tokenizer(tempfile.mkdtemp())
    teacher = train_tokenizer(tempfile.mkdtemp(), style="llama")
    rng = random.Random(0)
    responses = []
    for _ in range(args.samples):
        parts = []
        while True:
            a, b = rng.randint(10, 99999), rng.randint(10, 99999)
            parts.append(f"Add {a} and {b}: carry the one, so {a} + {b} = {a + b}. ")
            ids = student("".join(parts), add_special_tokens=False)["input_ids"]
            if len(ids) >= args.tokens:
                break
        responses.append(ids[:args.tokens - 1] + [student.eos_token_id])
    texts = [student.decode(r[:-1]) for r in responses]
    cross = CrossTokenizer(student, teacher)

    start = time.perf_counter()
    teacher(texts, add_special_tokens=False)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    views = [cross.view("Compute the sum.", r, stopped=True) for r in responses]
    view_s = time.perf_counter() - start

    student_tokens = sum(len(v.student_span) for v in views)
    print(f"samples: {args.samples}")
    print(f"student_tokens_per_sample: {args.tokens}")
    print(f"teacher_encode_ms_per_sample: {1e3 * encode_s / args.samples:.3f}")
    print(f"cross_view_ms_per_sample: {1e3 * view_s / args.samples:.3f}")
    print(f"teacher_tokens_per_student_token: {sum(len(v.teacher_span) for v in views) / student_tokens:.4f}")
    print(f"student_tokens_per_span: {student_tokens / sum(v.n_spans for v in views):.4f}")
    print(f"cross_view_time_ratio_vs_teacher_encode: {view_s / encode_s:.2f}")


if __name__ == "__main__":
    main()
