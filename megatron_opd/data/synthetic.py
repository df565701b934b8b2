"""Synthetic verifiable tasks, generated locally (no datasets can be downloaded here).

Each sample is {"prompt", "answer", "domain"}; `solution(sample)` is a correct worked answer ending in
\\boxed{answer}, used for SFT of the demo's teacher. Seeded and reproducible.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass
class ArithmeticTask:
    """Multi-digit arithmetic: "Compute 37+48." -> "37+48=85. \\boxed{85}" (domain "math")."""

    digits: int = 2
    """Operand digits."""

    ops: str = "+"
    """Operators to draw from (subset of "+-*")."""

    def __post_init__(self):
        if not 1 <= self.digits <= 9:
            raise ValueError("ArithmeticTask.digits must be in [1, 9]")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError("ArithmeticTask.ops must be a non-empty subset of '+-*'")

    def samples(self, n: int, seed: int = 0) -> list[dict]:
        rng = random.Random(seed)
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        out = []
        for _ in range(n):
            a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(self.ops)
            value = a + b if op == "+" else a - b if op == "-" else a * b
            out.append({"prompt": f"Compute {a}{op}{b}.", "answer": str(value), "domain": "math",
                        "a": a, "b": b, "op": op})
        return out

    def solution(self, sample: dict, drop_carries: bool = False) -> str:
        """The worked answer. `drop_carries=True` writes the typical learner's mistake instead: an
        addition done digit by digit without carrying (37+48 -> 75); other operators stay correct."""
        a, b, op = sample["a"], sample["b"], sample["op"]
        answer = carry_free_sum(a, b) if drop_carries and op == "+" else sample["answer"]
        return f"{a}{op}{b}={answer}. \\boxed{{{answer}}}"


def carry_free_sum(a: int, b: int) -> str:
    """Digit-wise sum mod 10, i.e. addition that forgets every carry: 37+48 -> "75", 95+17 -> "2"."""
    if a < 0 or b < 0:
        raise ValueError(f"carry_free_sum needs non-negative operands, got {a}, {b}")
    digits, place = 0, 1
    while a or b:
        digits += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return str(digits)


@dataclass
class StringTask:
    """Reverse a short letter string: "Reverse abcde." -> "reversed: \\boxed{edcba}" (domain "code"); the
    second domain of multi-teacher runs."""

    length: int = 5
    """Letters per string."""

    def samples(self, n: int, seed: int = 0) -> list[dict]:
        rng = random.Random(seed + 7919)
        out = []
        for _ in range(n):
            s = "".join(rng.choice("abcdefgh") for _ in range(self.length))
            out.append({"prompt": f"Reverse {s}.", "answer": s[::-1], "domain": "code"})
        return out

    def solution(self, sample: dict, unreversed: bool = False) -> str:
        """The worked answer. `unreversed=True` writes the typical learner's mistake instead: the string
        copied as it is (abcde -> abcde)."""
        answer = sample["answer"][::-1] if unreversed else sample["answer"]
        return f"reversed: \\boxed{{{answer}}}"


SYNTHETIC_KINDS = ("arithmetic", "string", "mixed")


def make_samples(kind: str, n: int, seed: int = 0, digits: int = 2) -> list[dict]:
    """"arithmetic", "string" (reversal) or "mixed" (alternating arithmetic / string reversal; the same
    problems as the first two kinds draw with this seed)."""
    if kind == "arithmetic":
        return ArithmeticTask(digits=digits).samples(n, seed)
    if kind == "string":
        return StringTask().samples(n, seed)
    if kind == "mixed":
        math_s = ArithmeticTask(digits=digits).samples((n + 1) // 2, seed)
        code_s = StringTask().samples(n // 2, seed)
        return [s for pair in zip(math_s, code_s) for s in pair] + math_s[len(code_s):]
    raise ValueError(f"synthetic task {kind!r}: use one of {SYNTHETIC_KINDS}")


def worked_solution(sample: dict, mistake: bool = False, digits: int = 2) -> str:
    """The worked answer of a sample of any kind; `mistake=True`: its task's typical learner's mistake
    (addition without carries, a string copied instead of reversed)."""
    if sample["domain"] == "code":
        return StringTask().solution(sample, unreversed=mistake)
    return ArithmeticTask(digits=digits).solution(sample, drop_carries=mistake)


def write_jsonl(samples: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in samples:
            f.write(json.dumps({k: v for k, v in s.items() if k in ("prompt", "answer", "domain")}) + "\n")
    return path


def write_parquet(samples: Iterable[dict], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: s[k] for k in ("prompt", "answer", "domain")} for s in samples]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path
