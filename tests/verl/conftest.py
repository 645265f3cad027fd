"""Tests of hwnoise.integrations.verl: run in .venv-verl (verl 0.9.x), `make test-verl`.

Named `test_*_on_cpu.py` as verl's own CPU tests are. The main suite does not collect this
directory (tests/conftest.py), since the main environment has no verl.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)
