"""SLURM preemption: SIGTERM (and SIGUSR1, which `#SBATCH --signal` can send before the time limit)
set a flag; the training loop checkpoints at the next step boundary and exits with code 0, so SLURM
requeues the job and it resumes from that checkpoint."""

from __future__ import annotations

import signal
import threading


class PreemptionFlag:
    """Records termination requests instead of dying mid-step (which could corrupt a checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self._event = threading.Event()
        self._previous = {}
        self.signum = None

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
