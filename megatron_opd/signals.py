"""Preemption: SIGTERM (and SIGUSR1, which `#SBATCH --signal` can send before the time limit) set a
flag; the trainer agrees on it over all ranks between phases, abandons a step whose update has not run
(or keeps one that has), checkpoints, and `megatron-opd train` exits with PREEMPTED_EXIT_CODE. Whatever
runs the job decides what that code means (a SLURM batch script requeues on it); a run started again
on the same out_dir resumes from that checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run that stopped on a preemption signal after checkpointing (EX_TEMPFAIL: "try
again"), distinct from success (0), a user error (2) and a crash."""

PREEMPTED_MARKER = "PREEMPTED"
"""File the trainer writes into its run directory (holding the checkpointed step) when a preemption ended
the run, and removes when a run starts there. Under torchrun the exit code does not survive (torchrun
exits 1 after forwarding a signal), so a SLURM batch script requeues on this file (launch/submit.py)."""


def die_with_parent() -> None:
    """In a helper process: be killed (SIGKILL) when the process that started it dies, even by kill -9,
    which no handler sees (Linux prctl PR_SET_PDEATHSIG; a no-op elsewhere). Without it a helper such as
    megatron's checkpoint-writer Manager outlives a killed trainer."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def shielded_children(signals: tuple = (signal.SIGTERM, signal.SIGUSR1)):
    """Processes started inside never receive SIGTERM or SIGUSR1: the signals are blocked while they
    start, and a blocked mask survives fork and exec. SLURM delivers a job's preemption signal to every
    process of the step, not only to the trainer: helper processes (megatron's checkpoint-writer Manager,
    vLLM's engine core) would otherwise die before the trainer has written its checkpoint. This process
    loses nothing: a signal that arrives meanwhile stays pending and is handled when the block lifts.

    Args:
        signals: the signals to block (a helper that is itself stopped with SIGTERM, like vLLM's engine
            core, must keep receiving it: pass (SIGUSR1,)).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


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
