"""How a replica's rollout sequences are cut into mini-batches (one optimizer update each) and
micro-batches (one forward/backward each). Pure: row indices in, row indices out.

Without a token budget, micro-batches are `max_rows` sequences in rollout order and the mini-batches
equal groups of them. With a budget, each mini-batch (an equal contiguous share of the rows) is sorted
by length, longest first, and cut greedily so that rows x longest <= budget (at most `max_rows` rows):
long sequences travel in small micro-batches, short ones in wide ones, and little of a micro-batch is
padding. The loss is normalised by the step's global token count, so the cut changes no result.
"""

from __future__ import annotations

from typing import Optional


def plan_micro_batches(lengths: list[int], mini_batches: int, max_rows: int,
                       max_tokens: Optional[int] = None) -> list[list[list[int]]]:
    """Row indices of every micro-batch of every mini-batch: `plan[m][k]` = rows of micro-batch k of
    mini-batch m.

    Args:
        lengths: tokens of each sequence (prompt + response), `[B]`.
        mini_batches: optimizer updates per rollout batch.
        max_rows: most sequences per micro-batch.
        max_tokens: token budget of a micro-batch (rows x its longest sequence); None = fixed rows.
    """
    B = len(lengths)
    if B == 0:
        return [[] for _ in range(mini_batches)]
    if max_tokens is None:
        micro = [list(range(i, min(i + max_rows, B))) for i in range(0, B, max_rows)]
        if len(micro) % mini_batches:
            raise ValueError(f"{len(micro)} micro-batches do not split into {mini_batches} mini-batches")
        per = len(micro) // mini_batches
        return [micro[m * per:(m + 1) * per] for m in range(mini_batches)]
    if B % mini_batches:
        raise ValueError(f"{B} sequences do not split into {mini_batches} mini-batches")
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(f"a sequence of {longest} tokens exceeds the micro-batch token budget {max_tokens}")
    per = B // mini_batches
    plan = []
    for m in range(mini_batches):
        rows = sorted(range(m * per, (m + 1) * per), key=lambda r: (-lengths[r], r))
        micro, current = [], []
        for r in rows:  # rows arrive longest first: the first row of a micro-batch sets its width
            if current and (len(current) == max_rows or (len(current) + 1) * lengths[current[0]] > max_tokens):
                micro.append(current)
                current = []
            current.append(r)
        micro.append(current)
        plan.append(micro)
    return plan


def padded_tokens(lengths: list[int], plan: list[list[list[int]]]) -> int:
    """Tokens the plan's micro-batches compute, padding included (sum of rows x longest)."""
    return sum(len(rows) * max(lengths[r] for r in rows) for mini in plan for rows in mini if rows)

