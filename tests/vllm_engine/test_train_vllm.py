"""`hwnoise train` with `rollout.engine: vllm` on the bundled model, a real vLLM engine (CPU build).

Two runs of 2 GRPO steps through the command line (each its own process: TRL's colocate engine
joins a process group), the same config except the rollout emulation: `weights:mxfp4` + AQN, and
clean. Each run's summary (run.json's log_history) must carry TRL's rollout-training log-prob
difference at every step; the emulated run must show the weights check after each sync and a
larger difference than the clean one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vllm" / "mxfp4_w4a16_aqn.yaml"
# Cheap: 2 steps of one prompt group (4 completions of <= 16 tokens), 2 held-out problems.
TINY = ["steps=2", "data.n_train=8", "data.n_eval=2", "eval.max_new_tokens=16", "algorithm.max_completion_length=16",
        "algorithm.batch_size=4", "algorithm.num_generations=4", "device=cpu", "threads=2", "logging.report_to=none",
        "logging.save_steps=0", "aqn.schedule=constant", "aqn.sigma_start=0.01", "eval.every=0"]
DIFF = "sampling/sampling_logp_difference/mean"


def _train(out: Path, *overrides: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [str(Path(sys.executable).parent / "hwnoise"), "train", str(EXAMPLE), *TINY, *overrides, "--out", str(out)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((out / "run.json").read_text())


def _steps(run: dict) -> list[dict]:
    return [entry for entry in run["log_history"] if "step" in entry and DIFF in entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train-vllm")
    emulated = _train(base / "mxfp4-aqn")
    clean = _train(base / "clean", "emulation.rollout=clean", "aqn.enabled=false")
    return emulated, clean


def test_emulated_vllm_run_logs_the_logp_difference_per_step(runs):
    emulated, _ = runs
    assert emulated["status"] == "finished" and emulated["steps"] == 2
    assert emulated["config"]["rollout"]["engine"] == "vllm"
    steps = _steps(emulated)
    assert [e["step"] for e in steps] == [1, 2]
    for entry in steps:
        assert entry[DIFF] > 0
        assert entry["rollout/weights_quantized"] == 30 * 7  # every decoder linear, synced quantized
        assert entry["rollout/vllm_weight_check"] == 1.0  # read back from vLLM == quantize(synced)
        assert entry["aqn/sigma"] == pytest.approx(0.01)
        assert entry["aqn/effective_std"] == pytest.approx(0.01, rel=0.1)


def test_clean_vllm_rollout_has_a_smaller_difference(runs):
    emulated, clean = runs
    assert clean["status"] == "finished"
    clean_steps = _steps(clean)
    assert [e["step"] for e in clean_steps] == [1, 2]
    assert all("rollout/weights_quantized" not in e and "aqn/sigma" not in e for e in clean_steps)
    mean = lambda run: sum(e[DIFF] for e in _steps(run)) / 2  # noqa: E731
    assert mean(clean) < mean(emulated) / 2, (mean(clean), mean(emulated))
