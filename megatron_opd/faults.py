"""Named fault-injection points for failure tests (off unless MEGATRON_OPD_FAULT is set).

    MEGATRON_OPD_FAULT="refit_bucket@2#1"   raise InjectedFault at the point "refit_bucket" on
                                            global rank 2, the second time it is reached (0-based)

`@rank` and `#index` are optional (any rank, first time). Production code calls `maybe_fail(point)`
where a real failure could occur; with the variable unset it costs one dict lookup.
"""

from __future__ import annotations

import os
import re
from collections import Counter

ENV = "MEGATRON_OPD_FAULT"
_seen: Counter = Counter()


class InjectedFault(RuntimeError):
    """Raised by `maybe_fail` at the configured point."""


_SPEC = re.compile(r"^(?P<point>\w+)(@(?P<rank>\d+))?(#(?P<index>\d+))?$")


def maybe_fail(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    m = _SPEC.match(spec)
    if m is None:
        raise ValueError(f"{ENV}={spec!r}: use POINT[@RANK][#INDEX], e.g. refit_bucket@2#1")
    if m["point"] != point:
        return
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if m["rank"] is not None and int(m["rank"]) != rank:
        return
    count = _seen[point]
    _seen[point] += 1
    if count == int(m["index"] or 0):
        raise InjectedFault(f"injected fault at {point} (rank {rank}, occurrence {count})")
