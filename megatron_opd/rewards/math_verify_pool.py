"""math-verify grading in a process pool with a per-item timeout.

math-verify 0.9 enforces its own timeouts with signal.alarm, which only works in a main thread: it
must run in worker processes, never threads. A worker that hangs or crashes scores 0 and is counted;
the pool is then rebuilt so one pathological answer cannot stall training.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from typing import Optional


def _verify_one(response: str, answer: str) -> float:
    from math_verify import parse, verify

    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    pred = parse(response)
    return float(bool(gold) and bool(pred) and verify(gold, pred))


class MathVerifier:
    """Batch grader: `score(responses, answers) -> [0/1 ...]`."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError("MathVerifier needs num_workers >= 1 and timeout_s > 0")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.timeouts = 0
        self.errors = 0
        self._pool: Optional[cf.ProcessPoolExecutor] = None

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: never fork a process holding torch threads / gloo sockets
            self._pool = cf.ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def score(self, responses: list[str], answers: list[str], fn=_verify_one) -> list[float]:
        if len(responses) != len(answers):
            raise ValueError(f"responses ({len(responses)}) and answers ({len(answers)}) differ in length")
        pool = self._executor()
        futures = [pool.submit(fn, r, a) for r, a in zip(responses, answers)]
        scores = []
        broken = False
        for fut in futures:
            try:
                scores.append(float(fut.result(timeout=self.timeout_s)))
            except cf.TimeoutError:
                self.timeouts += 1
                scores.append(0.0)
                broken = True
            except Exception:  # a crash in the grader scores 0, it does not stop training
                self.errors += 1
                scores.append(0.0)
        if broken:  # a hung worker would block later batches: replace the pool
            self.close(wait=False)
        return scores

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            if not wait:
                for proc in list(getattr(self._pool, "_processes", {}).values()):
                    proc.kill()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
