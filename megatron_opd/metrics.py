"""Run metrics: one JSON line per step, TensorBoard scalars, a PNG of the main curves, and W&B when
asked for (`metrics.wandb`).

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


#: The W&B run id of a run directory: a resumed run logs into the same W&B run.
WANDB_RUN_ID = "wandb_run_id"


class MetricsLogger:
    """jsonl + TensorBoard (+ W&B) writer for rank 0 (a no-op object on other ranks).

    Args:
        wandb: a `config.WandbConfig`, or None for no W&B.
        run_config: the run's config as a dict, recorded with the W&B run.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: Optional[int] = None,
                 wandb=None, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        if wandb is not None:
            self._wandb = _start_wandb(wandb, self.out_dir, resumed=resume_step is not None and resume_step >= 0,
                                       run_config=run_config)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        finite = {k: v for k, v in clean.items() if v is not None and math.isfinite(v)}
        for k, v in finite.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(finite, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg, out_dir: Path, resumed: bool, run_config: Optional[dict]):
    """A W&B run in `out_dir/wandb/`: the run directory's own when resumed (its id is kept in
    WANDB_RUN_ID), a new one for a fresh run."""
    import uuid

    import wandb

    id_file = out_dir / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or out_dir.resolve().name,
                      mode=cfg.mode, dir=str(out_dir), id=run_id, resume="allow", config=run_config)


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
