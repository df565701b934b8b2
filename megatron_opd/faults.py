"""Named fault-injection points for failure tests (off unless MEGATRON_OPD_FAULT is set).

    MEGATRON_OPD_FAULT="refit_bucket@2#1"   raise InjectedFault at the point "refit_bucket" on
                                            global rank 2, the second time it is reached (0-based)
    MEGATRON_OPD_FAULT="phase_score#1:SIGKILL"
                                            send SIGKILL (or SIGTERM, SIGUSR1) to this process
                                            instead: a node dying, or a preemption, at that point

`@rank`, `#index` and `:ACTION` are optional (any rank, first time, raise). Production code calls
`maybe_fail(point)` where a real failure could occur; with the variable unset it costs one dict lookup.
Points: phase_<rollout|sleep|score|update|wake|refit> (start of a training phase), refit_bucket,
checkpoint_files_written / checkpoint_renamed (inside a save), step_logged (metrics written, before the
step's checkpoint).
"""

from __future__ import annotations

import os
import re
from collections import Counter

ENV = "MEGATRON_OPD_FAULT"
_seen: Counter = Counter()


class InjectedFault(RuntimeError):
    """Raised by `maybe_fail` at the configured point."""


_SPEC = re.compile(r"^(?P<point>\w+)(@(?P<rank>\d+))?(#(?P<index>\d+))?(:(?P<action>SIGKILL|SIGTERM|SIGUSR1))?$")


def maybe_fail(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    m = _SPEC.match(spec)
    if m is None:
        raise ValueError(f"{ENV}={spec!r}: use POINT[@RANK][#INDEX][:SIGKILL|SIGTERM|SIGUSR1], "
                         "e.g. refit_bucket@2#1")
    if m["point"] != point:
        return
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if m["rank"] is not None and int(m["rank"]) != rank:
        return
    count = _seen[point]
    _seen[point] += 1
    if count == int(m["index"] or 0):
        if m["action"]:
            import signal

            os.kill(os.getpid(), getattr(signal, m["action"]))
            return  # SIGTERM / SIGUSR1 set the preemption flag and training goes on
        raise InjectedFault(f"injected fault at {point} (rank {rank}, occurrence {count})")
