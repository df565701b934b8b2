"""GPU smoke test of the training path on one device (world size 1): run it on a CUDA machine with
`bash scripts/gpu_smoke.sh`; on CPU it runs every check that does not need CUDA and reports the rest as
skipped, with the reason.

Checks, each printed as one JSON line {"check": ..., "status": "ok" | "skipped" | "failed", ...}:
  forward_backward  tiny dense student (tied embeddings) + tiny Qwen3-MoE teacher built by megatron-core
                    on platform.device() (bf16 on GPU, fp32 on CPU): teacher forward, student
                    forward + backward through the pipeline schedule, every gradient finite
  logprobs          from the student's logits and fused with its LM head, against a dense fp64
                    log-softmax of the same logits / the same bf16 GEMM
  optimizer_step    one megatron optimizer step moves the weights and keeps them finite
  checkpoint        save, then load into a freshly built student: every weight identical
  sleep_wake        (CUDA + vLLM) an engine's greedy output is the same after sleep(level=1) / wake_up
  fp8_lm_head       (CUDA + Transformer Engine) FP8 LM-head log-probs within 0.25 nats of bf16
  logprob_timing    (CUDA) fused log-probs vs the bare LM-head GEMM at T=8192, V=151,936, H=2,560,
                    bf16: prints `logprob_time_ratio_vs_matmul_gpu: x`

Exit status: 1 if any check failed (or, with --require-gpu, if CUDA is absent), else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS: list[dict] = []


def report(check: str, status: str, **fields) -> None:
    row = {"check": check, "status": status, **fields}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def run(check: str, fn, needs: str | None = None) -> None:
    """Run one check; `needs` names what is missing when the check cannot run here."""
    if needs:
        report(check, "skipped", reason=needs)
        return
    try:
        report(check, "ok", **(fn() or {}))
    except Exception as exc:  # a smoke test reports every failure, then goes on
        report(check, "failed", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--require-gpu", action="store_true", help="fail when CUDA is absent")
    ap.add_argument("--timing-repeats", type=int, default=5)
    args = ap.parse_args()

    from megatron_opd import parallel, platform
    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.builder import PrecisionConfig, build_gpt_model
    from megatron_opd.batching import ForwardBatch
    from megatron_opd.models.forward import run_micro_batches
    from megatron_opd.models.hf_mapping import HFCheckpoint, load_hf_into_megatron
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.spec import ModelSpec
    from megatron_opd.models.student import OptimConfig, build_optimizer, wrap_ddp

    gpu = platform.on_gpu()
    no_cuda = None if gpu else "no CUDA device on this machine"
    if args.require_gpu and not gpu:
        report("platform", "failed", error="--require-gpu given but torch.cuda.is_available() is False")
        return 1
    report("platform", "ok", device=str(platform.device()), torch=torch.__version__,
           gpu=torch.cuda.get_device_name() if gpu else None,
           transformer_engine=platform.has_transformer_engine(),
           vllm=importlib.util.find_spec("vllm") is not None)

    pcfg = parallel.ParallelConfig()
    parallel.initialize(pcfg, seed=1234)
    precision = PrecisionConfig(params_dtype="bfloat16" if gpu else "float32")
    work = Path(tempfile.mkdtemp(prefix="mopd_gpu_smoke_"))
    dense = ModelSpec.from_yaml(REPO / "configs" / "models" / "tiny_qwen3.yaml")
    student_spec = ModelSpec(**{**dense.__dict__, "tie_word_embeddings": True})  # like Qwen3-1.7B / 4B
    teacher_spec = ModelSpec.from_yaml(REPO / "configs" / "models" / "tiny_qwen3_moe.yaml")
    train_tokenizer(work / "tokenizer")
    student_ckpt = HFCheckpoint(save_tiny_checkpoint(student_spec, work / "student", seed=0, init_std=0.1,
                                                     tokenizer_dir=work / "tokenizer"))
    teacher_ckpt = HFCheckpoint(save_tiny_checkpoint(teacher_spec, work / "teacher", seed=1, init_std=0.1,
                                                     tokenizer_dir=work / "tokenizer"))
    state: dict = {}

    def build_student():
        model = build_gpt_model(student_spec, pcfg, precision, role="student")
        load_hf_into_megatron(model, student_spec, student_ckpt)
        return wrap_ddp(model)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, student_spec.vocab_size, (2, 32), generator=g)
    batch = platform.to_device(ForwardBatch(input_ids=ids))

    def forward_backward():
        teacher = build_gpt_model(teacher_spec, pcfg, precision, role="teacher")
        load_hf_into_megatron(teacher, teacher_spec, teacher_ckpt)
        captured = {}

        def keep_logits(name):
            def fn(mb, logits):  # [b, s, V]
                captured[name] = logits.detach()
                return logits.float().mean(), {}
            return fn

        run_micro_batches(teacher, [batch], keep_logits("teacher"), forward_only=True)
        student = build_student()
        state["student"] = student
        student.zero_grad_buffer()
        run_micro_batches(student, [batch], keep_logits("student"), forward_only=False)
        grads = [b.grad_data for b in student.buffers]
        assert all(bool(torch.isfinite(gr).all()) for gr in grads), "non-finite gradient"
        assert captured["teacher"].device.type == platform.device().type, "teacher logits off the device"
        state["logits"] = captured["student"]
        return {"logits_dtype": str(captured["student"].dtype),
                "grad_norm": float(sum(gr.float().pow(2).sum() for gr in grads) ** 0.5)}

    def logprobs():
        from megatron_opd.logprobs import fused_lm_head_token_logprobs, vocab_parallel_token_logprobs

        V = student_spec.vocab_size
        logits = state["logits"][:, :-1]  # [b, s-1, V]
        target = batch.input_ids[:, 1:]
        lp, ent = vocab_parallel_token_logprobs(logits, target, valid_vocab_size=V, compute_entropy=True)
        ref = torch.log_softmax(logits[..., :V].double(), -1)
        ref_lp = ref.gather(-1, target[..., None])[..., 0]
        ref_ent = -(ref.exp() * ref).sum(-1)
        err_lp = (lp.double() - ref_lp).abs().max().item()
        err_ent = (ent.double() - ref_ent).abs().max().item()
        # fused with the LM head: hidden [T, H], weight [V, H] in the model dtype
        dt = precision.torch_dtype
        hidden = torch.randn(64, student_spec.hidden_size, generator=g).to(platform.device(), dt)
        weight = (torch.randn(V, student_spec.hidden_size, generator=g) * 0.1).to(platform.device(), dt)
        tgt = torch.randint(0, V, (64,), generator=g).to(platform.device())
        f_lp, _ = fused_lm_head_token_logprobs(hidden, weight, tgt, valid_vocab_size=V)
        dense = torch.log_softmax((hidden @ weight.t()).double(), -1).gather(-1, tgt[:, None])[:, 0]
        err_fused = (f_lp.double() - dense).abs().max().item()
        tol = 1e-5 if dt == torch.float32 else 2e-2  # bf16 logits: ~3 significant digits
        assert max(err_lp, err_ent, err_fused) <= tol, (err_lp, err_ent, err_fused, tol)
        return {"from_logits_max_err": err_lp, "entropy_max_err": err_ent, "fused_max_err": err_fused,
                "tolerance": tol}

    def optimizer_step():
        student = state["student"]
        opt, sched = build_optimizer(student, OptimConfig(lr=1e-3, lr_warmup_steps=0), total_steps=10)
        before = [p.detach().clone() for p in student.parameters()]
        ok, grad_norm, _ = opt.step()
        sched.step(1)
        moved = max((p.detach().float() - b.float()).abs().max().item()
                    for p, b in zip(student.parameters(), before))
        assert ok and moved > 0, "the optimizer step did not move the weights"
        assert all(bool(torch.isfinite(p).all()) for p in student.parameters())
        state["opt"], state["sched"] = opt, sched
        return {"grad_norm": float(grad_norm), "max_weight_change": moved}

    def checkpoint():
        from megatron_opd.checkpoint import load_checkpoint, save_checkpoint

        student = state["student"]
        save_checkpoint(work / "ckpt", 1, student, state["opt"], state["sched"], extra={"smoke": True})
        fresh = build_student()
        opt2, sched2 = build_optimizer(fresh, OptimConfig(lr=1e-3, lr_warmup_steps=0), total_steps=10)
        meta = load_checkpoint(work / "ckpt" / "step_1", fresh, opt2, sched2)
        for (name, a), b in zip(student.named_parameters(), fresh.parameters()):
            assert torch.equal(a, b), f"{name} differs after save/load"
        return {"step": meta["step"]}

    def sleep_wake():
        from megatron_opd.config import RolloutConfig
        from megatron_opd.rollout.engine import RolloutEngine

        engine = RolloutEngine(RolloutConfig(max_model_len=64, max_new_tokens=8, gpu_memory_utilization=0.2),
                               student_ckpt.path, in_process=True)
        prompt = [ids[0, :8].tolist()]
        before = engine.generate(prompt, n=1, temperature=0.0).samples[0].response_ids
        free0 = torch.cuda.mem_get_info()[0]
        engine.sleep()
        freed = torch.cuda.mem_get_info()[0] - free0
        engine.wake_up(["weights"])
        engine.wake_up(["kv_cache"])
        after = engine.generate(prompt, n=1, temperature=0.0).samples[0].response_ids
        engine.shutdown()
        assert before == after, (before, after)
        return {"freed_gib_while_asleep": freed / 2**30}

    def fp8_lm_head():
        from megatron_opd.logprobs import fused_lm_head_token_logprobs

        h = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16) * 0.05
        t = torch.randint(0, 1000, (64,), device="cuda")
        a, _ = fused_lm_head_token_logprobs(h, w, t, valid_vocab_size=1000, fp8=True)
        b, _ = fused_lm_head_token_logprobs(h, w, t, valid_vocab_size=1000, fp8=False)
        gap = (a - b).abs().max().item()
        assert gap < 0.25, gap
        return {"max_gap_nats": gap}

    def logprob_timing():
        from megatron_opd.logprobs import fused_lm_head_token_logprobs

        T, V, H = 8192, 151_936, 2_560
        h = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * 0.02
        t = torch.randint(0, V, (T,), device="cuda")

        def best(fn):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.timing_repeats):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return min(times)

        with torch.no_grad():
            matmul = best(lambda: h @ w.t())
            fused = best(lambda: fused_lm_head_token_logprobs(h, w, t, valid_vocab_size=V))
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            fused_lm_head_token_logprobs(h, w, t, valid_vocab_size=V)
        peak = torch.cuda.max_memory_allocated() / 2**30
        ratio = fused / matmul
        print(f"logprob_time_ratio_vs_matmul_gpu: {ratio:.3f}", flush=True)
        return {"matmul_s": matmul, "fused_s": fused, "logprob_time_ratio_vs_matmul_gpu": ratio,
                "fused_peak_gib": peak}

    run("forward_backward", forward_backward)
    run("logprobs", logprobs, needs=None if "logits" in state else "forward_backward failed")
    run("optimizer_step", optimizer_step, needs=None if "student" in state else "forward_backward failed")
    run("checkpoint", checkpoint, needs=None if "opt" in state else "optimizer_step failed")
    vllm_missing = None if importlib.util.find_spec("vllm") else "vLLM is not installed"
    run("sleep_wake", sleep_wake, needs=no_cuda or vllm_missing)
    run("fp8_lm_head", fp8_lm_head,
        needs=no_cuda or (None if platform.has_transformer_engine() else "Transformer Engine is not installed"))
    run("logprob_timing", logprob_timing, needs=no_cuda)
    parallel.destroy()
    failed = [r["check"] for r in RESULTS if r["status"] == "failed"]
    print(json.dumps({"smoke": "failed" if failed else "passed", "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
