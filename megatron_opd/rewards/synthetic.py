"""Exact verifiers for the synthetic tasks: the last \\boxed{...} must equal the gold answer."""

from __future__ import annotations

import re
from typing import Optional

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} in `text`, stripped; None if there is none."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def boxed_match_reward(response: str, answer: str) -> float:
    """1.0 if the last boxed answer equals `answer` (whitespace-insensitive), else 0.0."""
    got = extract_boxed(response)
    return float(got is not None and got.replace(" ", "") == str(answer).replace(" ", ""))
