"""Run metrics: one JSON line per step, TensorBoard scalars, and a PNG of the main curves.

Only global rank 0 writes. metrics.jsonl is appended line by line (flushed each step), so a crash or a
kill never loses the steps already written; on resume, lines for steps after the checkpoint are
dropped so the file stays one line per step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

#: Curves of the run plot: (metric key, panel title).
PLOT_PANELS = (
    ("eval/accuracy", "held-out accuracy (avg@k)"),
    ("reward/mean", "token reward (teacher - student log-prob)"),
    ("kl/student_teacher", "reverse KL to teacher (per token)"),
    ("rollout/response_length", "response length (tokens)"),
)


class MetricsLogger:
    """jsonl + TensorBoard writer for rank 0 (a no-op object on other ranks)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in clean.items():
            if v is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_float(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def plot_run(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Plot accuracy, reward, KL and length curves of a run to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(4.2 * len(PLOT_PANELS), 3.4))
    for ax, (key, panel) in zip(axes, PLOT_PANELS):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
