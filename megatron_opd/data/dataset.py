"""Prompt datasets: local jsonl/parquet or Hugging Face `datasets`, configurable field names, domain
tags for multi-teacher routing, and a resumable, epoch-shuffled position.

The position (epoch, index) is part of every checkpoint, so a resumed run draws exactly the prompts
an uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Union

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


Message = dict[str, str]
Prompt = Union[str, list[Message]]
"""A prompt: its text (the user message), or a whole chat message list that ends with a user message."""

_ROLES = ("system", "user", "assistant")


def load_records(
    path: str,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    domain_key: str = "domain",
    default_domain: str = "math",
    split: str = "train",
) -> list[dict]:
    """Read {prompt, answer, domain} records from a local file or a HF dataset name.

    A key may be a dotted path into nested records (`reward_model.ground_truth`); a top-level field
    whose name contains the dots wins. The prompt is text or a chat message list (`Prompt`).

    Raises:
        ValueError: unknown local format, a malformed line, a missing field or a prompt that is neither
            text nor a message list (named, with the fix).
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
        try:
            ds = datasets.load_dataset(_LOCAL_FORMATS[p.suffix], data_files=str(p), split="train")
        except Exception as exc:  # datasets buries the row under three chained tracebacks
            raise ValueError(_unreadable(p, exc)) from None
    else:  # a dataset name on the Hugging Face hub (needs network; offline machines use local files)
        ds = datasets.load_dataset(path, split=split)
    for key, field in ((prompt_key, "data.prompt_key"), (answer_key, "data.answer_key")):
        if key not in ds.column_names and key.split(".")[0] not in ds.column_names:
            raise ValueError(f"{path}: no field {key!r} (columns: {ds.column_names}); set {field} (a dotted "
                             "path reaches into nested fields, e.g. reward_model.ground_truth)")
    has_domain = domain_key in ds.column_names or domain_key.split(".")[0] in ds.column_names
    records = []
    for i, r in enumerate(ds):
        prompt = _prompt(_field(r, prompt_key, path, i, "data.prompt_key"), path, i, prompt_key)
        answer = _field(r, answer_key, path, i, "data.answer_key")
        if answer is None or isinstance(answer, (list, dict)):
            raise ValueError(f"{path}: record {i}'s data.answer_key={answer_key!r} is {answer!r:.60}, not an "
                             "answer; point data.answer_key at the field that holds the reference answer")
        domain = _field(r, domain_key, path, i, "data.domain_key", missing=None) if has_domain else None
        records.append({"prompt": prompt, "answer": str(answer),
                        "domain": str(domain) if domain is not None else default_domain})
    return records


def _field(record: dict, key: str, path: str, i: int, field: str, missing=KeyError):
    """record[key], or the nested record[a][b] for key "a.b"."""
    if key in record:
        return record[key]
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            if missing is not KeyError:
                return missing
            raise ValueError(f"{path}: record {i} has no {key!r} ({part!r} is missing); fix the record or {field}")
        value = value[part]
    return value


def _prompt(value, path: str, i: int, key: str) -> Prompt:
    """The prompt text, or a validated chat message list (role and content of each message only)."""
    where = f"{path}: record {i}'s data.prompt_key={key!r}"
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where} is empty; remove the record or point data.prompt_key at the question")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        messages = []
        for m in value:
            if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: message {m!r:.80} needs a role in {_ROLES} and text content")
            messages.append({"role": m["role"], "content": m["content"]})
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where} ends with a {messages[-1]['role']} message: the last message must be "
                             "the user's (the response is generated after it)")
        return messages
    # a number column (an id) would otherwise train on "12345"-style prompts without a word
    raise ValueError(f"{where} is {type(value).__name__} {value!r:.60}, not text or a chat message list; "
                     "point data.prompt_key at the column that holds the question")


def _is_json_lines(path: Path) -> bool:
    """Whether the first non-blank line of `path` is a whole JSON value (a .json file in JSON-lines form)."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    json.loads(line)
                    return True
                except ValueError:
                    return False
    return False


def has_system_message(prompt: Prompt) -> bool:
    return not isinstance(prompt, str) and any(m["role"] == "system" for m in prompt)


def _unreadable(path: Path, exc: Exception) -> str:
    """One line for a data file `datasets` could not read: the first malformed line of a json file."""
    import json

    if path.suffix == ".json":  # one JSON document (or JSON lines)
        try:
            json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except ValueError as err:
            if not _is_json_lines(path):
                return (f"data file {path} is not valid JSON at line {err.lineno}, column {err.colno} "
                        f"({err.msg}); fix it there")
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as err:
                    return f"data file {path} line {n} is not valid JSON ({err}); fix or remove that line"
    cause = exc.__cause__ or exc
    return f"data file {path} could not be read: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}"


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
