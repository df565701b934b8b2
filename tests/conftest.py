"""Shared fixtures; helpers live in tests/mopd_testing.py (a unique module name, so test directories
with their own conftest.py can import them)."""

import pytest
import torch

from mopd_testing import REPO_ROOT, run_ranks  # noqa: F401  (re-exported for `from conftest import`)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (GPU-only path; see README 'What runs where')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def ranks():
    return run_ranks
