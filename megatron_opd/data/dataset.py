"""Prompt datasets: local jsonl/parquet or Hugging Face `datasets`, configurable field names, domain
tags for multi-teacher routing, and a resumable, epoch-shuffled position.

The position (epoch, index) is part of every checkpoint, so a resumed run draws exactly the prompts
an uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_records(
    path: str,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    domain_key: str = "domain",
    default_domain: str = "math",
    split: str = "train",
) -> list[dict]:
    """Read {prompt, answer, domain} records from a local file or a HF dataset name.

    Raises:
        ValueError: unknown local format, or a missing prompt/answer field (named, with the fix).
    """
    import datasets

    p = Path(path)
    if p.suffix in _LOCAL_FORMATS or p.exists():
        if p.suffix not in _LOCAL_FORMATS:
            raise ValueError(f"data file {path}: unknown format {p.suffix!r}; use .jsonl, .json or .parquet")
        if not p.is_file():
            raise ValueError(f"data file {path} does not exist")
        if p.suffix != ".parquet" and not _has_text(p):  # `datasets` would fail with StopIteration
            raise ValueError(f"data file {path} is empty: it needs one record per line with "
                             f"{prompt_key!r} and {answer_key!r} fields")
        ds = datasets.load_dataset(_LOCAL_FORMATS[p.suffix], data_files=str(p), split="train")
    else:  # a dataset name on the Hugging Face hub (needs network; offline machines use local files)
        ds = datasets.load_dataset(path, split=split)
    for key, field in ((prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")):
        if key not in ds.column_names:
            raise ValueError(f"{path}: no field {key!r} (columns: {ds.column_names}); set {field}")
    has_domain = domain_key in ds.column_names
    records = []
    for i, r in enumerate(ds):
        prompt = r[prompt_key]
        if not isinstance(prompt, str) or not prompt.strip():
            # a number column (an id) would otherwise train on "12345"-style prompts without a word
            raise ValueError(
                f"{path}: record {i}'s data.prompt_key={prompt_key!r} is {type(prompt).__name__} {prompt!r:.60}, "
                "not text; point data.prompt_key at the column that holds the question")
        records.append({"prompt": prompt, "answer": str(r[answer_key]),
                        "domain": str(r[domain_key]) if has_domain and r[domain_key] is not None else default_domain})
    return records


def _has_text(path: Path) -> bool:
    """Whether a text file holds anything but whitespace (reads up to its first non-blank line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(line.strip() for line in f)


class PromptDataset:
    """Epoch-shuffled prompts with a resumable position."""

    def __init__(self, records: list[dict], seed: int = 0, source: str = "the prompt dataset"):
        if not records:
            raise ValueError(f"{source} has no prompts: training needs at least one")
        self.records = records
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            out.append(self.records[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)

    def __len__(self) -> int:
        return len(self.records)
