"""Helpers shared by the test suite (importable from any test directory as `mopd_testing`).

Multi-rank tests run a worker script under `torch.distributed.run` (gloo on CPU) in a subprocess with
a hard timeout: a hung collective must fail the test, not the CI run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_ranks(script: Path, nproc: int, *args: str, timeout: float = 300.0, env: dict | None = None,
              module: bool = False) -> str:
    """Run `script` on `nproc` gloo ranks with torchrun; return its stdout, raise with the logs on failure.
    module=True runs the package module at that path (`-m megatron_opd.cli`) instead of the file."""
    run_env = dict(os.environ)
    run_env.setdefault("OMP_NUM_THREADS", "1")
    run_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), run_env.get("PYTHONPATH", "")])
    if env:
        run_env.update(env)
    target = ["-m", ".".join(Path(script).relative_to(REPO_ROOT).with_suffix("").parts)] if module \
        else [str(script)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target,
        *args,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{Path(script).name} x{nproc} timed out after {timeout}s\n{exc.stdout}\n{exc.stderr}")
    if proc.returncode != 0:
        raise AssertionError(
            f"{Path(script).name} x{nproc} failed (exit {proc.returncode})\nSTDOUT:\n{proc.stdout[-6000:]}"
            f"\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def kill_ranks_when(script: Path, nproc: int, *args: str, marker: Path, timeout: float = 1200.0) -> None:
    """Run `script` on `nproc` ranks and SIGKILL its whole process group (every rank and every engine
    process, mid-run) as soon as `marker` exists."""
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() - t0 < timeout, f"{marker} never appeared"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def last_json(out: str, key: str) -> dict:
    """The last JSON object in ``out`` that starts with ``{"key"``. Found by position, not by line:
    vLLM's engine-core subprocess shares the worker's stdout and can append its log to the same line."""
    start = out.rfind('{"%s"' % key)
    assert start >= 0, f'no {{"{key}": ...}} result in the output:\n{out[-4000:]}'
    return json.JSONDecoder().raw_decode(out, start)[0]


def tiny_spec(name: str, **overrides):
    """A model spec from configs/models/<name>.yaml with some fields replaced."""
    from megatron_opd.models.spec import ModelSpec

    spec = ModelSpec.from_yaml(REPO_ROOT / "configs" / "models" / f"{name}.yaml")
    return ModelSpec(**{**spec.__dict__, **overrides})


def tiny_checkpoints(tmp_path_factory, seeds, spec: str = "tiny_qwen3") -> list:
    """Tiny random HF checkpoints (one per seed) sharing one locally trained tokenizer."""
    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint

    tok = tmp_path_factory.mktemp("tok")
    train_tokenizer(tok)
    return [save_tiny_checkpoint(tiny_spec(spec), tmp_path_factory.mktemp(f"m{seed}"), seed=seed,
                                 tokenizer_dir=tok, init_std=0.1) for seed in seeds]


def run_overrides(models, out_dir, *extra) -> list[str]:
    """key=value overrides that point a recipe at a (student, teacher) pair and a run directory."""
    student, teacher = models
    return [f"student.checkpoint={student}", f"teachers=[{{checkpoint: {teacher}}}]",
            f"train.out_dir={out_dir}", *extra]


def wandb_rows(run_dir: Path, count: int, timeout: float = 30.0) -> list[dict]:
    """The logged steps of every offline W&B run file under `run_dir`/wandb (oldest run first), once
    there are `count` of them: wandb-core writes the files from its own process, and `finish()` can return
    before its last records reach the disk (a resumed run's one step was missing once, read at once)."""
    import time

    deadline = time.time() + timeout
    while True:
        files = sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
        rows = [row for f in files for row in wandb_history(f)]
        if len(rows) >= count or time.time() > deadline:
            return rows
        time.sleep(0.2)


def wandb_history(run_file: Path) -> list[dict]:
    """The logged steps of an offline W&B run file (run-<id>.wandb): {"_step": n, key: value, ...} each.
    wandb 0.31 has no Python reader (its Go core writes the file), so this reads the format itself: a
    7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks (crc32,
    length, type: 1 full, 2 first, 3 middle, 4 last), each record a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(parts)
            parts = b""
    steps = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            steps.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return steps


def coarsen_to_top_k(log_p, log_q, top_k: int):
    """The top-k KL's reference: both models' [n, V] log-probs -> [n, k + 1], the teacher's (`log_q`'s
    for reverse, pass them in that order) top-k tokens and one tail bucket holding the rest of each
    model's mass. `log_q` picks the tokens: pass the teacher's log-probs second."""
    import torch

    keep = log_q.topk(top_k, -1).indices
    outside = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, keep, False)

    def coarse(lp):
        tail = lp.masked_fill(~outside, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([lp.gather(1, keep), tail], dim=-1)

    return coarse(log_p), coarse(log_q)
