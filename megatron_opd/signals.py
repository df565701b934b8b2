"""Preemption: SIGTERM (and SIGUSR1, which `#SBATCH --signal` can send before the time limit) set a
flag; the trainer agrees on it over all ranks between phases, abandons a step whose update has not run
(or keeps one that has), checkpoints, and `megatron-opd train` exits with PREEMPTED_EXIT_CODE. Whatever
runs the job decides what that code means (a SLURM batch script requeues on it); a run started again
on the same out_dir resumes from that checkpoint."""

from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run that stopped on a preemption signal after checkpointing (EX_TEMPFAIL: "try
again"), distinct from success (0), a user error (2) and a crash."""


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
