"""Library noise filtered once, at start-up of the command line: the warnings below are harmless for
megatron_opd, each for the reason given, and were 50 of the 65 lines a 2-step tiny run printed. Anything
not listed (every error, and every warning not matched here) still shows.

`MEGATRON_OPD_VERBOSE=1` turns the filtering off.
"""

from __future__ import annotations

import logging
import os
import warnings

#: Python warnings (message regex, category) -> why they are harmless here.
_PY_WARNINGS = [
    # megatron-core falls back to torch implementations without TE/Apex: that is the CPU path, and on
    # GPU the TE spec is chosen when TE is installed (a missing TE is reported by models/builder.py).
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning),
    # megatron-core 0.16.1 TransformerConfig default; no CUDA graphs are used.
    (r"full scope is deprecated", UserWarning),
    # vLLM's triton dispatcher touches a deprecated torch attribute while scanning modules.
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning),
]

#: vLLM log messages (substring) that are harmless for megatron_opd's use of it.
_VLLM_MESSAGES = [
    # The refit reloads HF tensors; rotary embeddings have none and are recomputed. Refit exactness is
    # tested (tests/rollout/test_refit.py), so this warning on every refit says nothing.
    "RotaryEmbedding: Failed to load weights",
    # CPU performance hints (tcmalloc / iomp preload, Triton CPU, thread binding): no effect on results.
    "is not found in LD_PRELOAD",
    "Triton is not installed",
    "Model Runner V2 requires Triton",
    "doesn't allow to use `torch.set_num_threads`",
    # Settings megatron_opd chooses on purpose (rollout/engine.py, platform/): eager mode for refit,
    # whole prefills for seeded reproducible sampling, the seed itself.
    "Enforce eager set",
    "Inductor compilation was disabled",
    "does not officially support disabling chunked prefill",
    "The global random seed is set to",
]


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of `needles`."""

    def __init__(self, needles):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


def quiet_libraries() -> None:
    """Filter the harmless library output listed above (idempotent)."""
    if os.environ.get("MEGATRON_OPD_VERBOSE") == "1":
        return
    for pattern, category in _PY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # vLLM configures its logging itself when an engine starts (and again in engine-core subprocesses),
    # replacing any handler filter added earlier; its supported hook is a logging config file, which
    # every process reads from VLLM_LOGGING_CONFIG_PATH. INFO lines (engine configuration, load
    # timings, one per refit) are dropped too.
    if "VLLM_LOGGING_CONFIG_PATH" in os.environ:
        return  # the user's own vLLM logging config wins
    import copy
    import json
    import tempfile

    from vllm.logger import DEFAULT_LOGGING_CONFIG

    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["filters"] = {"megatron_opd": {"()": f"{__name__}._DropMessages", "needles": _VLLM_MESSAGES}}
    config["handlers"]["vllm"].update(level=level, formatter="vllm", filters=["megatron_opd"])
    config["loggers"]["vllm"]["level"] = level
    for formatter in config["formatters"].values():
        formatter["log_level"] = level
    path = os.path.join(tempfile.gettempdir(), f"megatron_opd_vllm_logging_{os.getuid()}.json")
    with open(path + f".{os.getpid()}", "w") as f:
        json.dump(config, f)
    os.replace(path + f".{os.getpid()}", path)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
