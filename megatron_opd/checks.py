"""Input checks of the math layer that cost no host synchronisation inside the training step.

A check that raises must read its condition on the host: on an accelerator that waits for every
queued kernel, and a check per micro-batch stalls the pipeline schedule once per micro-batch. Outside
`deferred()` a check raises at once (direct use of the math functions: immediate, named errors). Inside
it, each failed-or-not condition is kept as a device flag and `deferred()` reads them all at its exit
in one reduction, raising the first failed check's message: the training step wraps its scoring and
update in one `deferred()`, so the step's checks cost one host read, whatever the micro-batch count.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_STATE = threading.local()


def require(ok: torch.Tensor, message: str) -> None:
    """`ok`: a boolean tensor (reduced with `all`). Raise ValueError(message) if false, now or at the
    end of the enclosing `deferred()` block."""
    pending = getattr(_STATE, "pending", None)
    if pending is None:
        if not bool(ok.all()):
            raise ValueError(message)
        return
    pending.append((ok.all().reshape(1), message))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Collect the `require` checks made inside and raise the first that failed when the block ends
    (one host read for all of them). Nested blocks join the outermost one."""
    if getattr(_STATE, "pending", None) is not None:
        yield
        return
    _STATE.pending = []
    try:
        yield
        pending = _STATE.pending
    finally:
        _STATE.pending = None
    if pending:
        flags = torch.cat([ok.to(pending[0][0].device) for ok, _ in pending])
        failed = (~flags).nonzero()  # the one host read of the block
        if failed.numel():
            raise ValueError(pending[int(failed[0])][1])
