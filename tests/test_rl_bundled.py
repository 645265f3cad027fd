"""Must-show 1: `hwnoise train` runs 6 GRPO steps of the bundled model on CPU, MXFP4 W4A16 + AQN,
and its TensorBoard log holds sigma per step matching the schedule, the reward and the eval accuracy."""

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mxfp4_w4a16_aqn.yaml"


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_six_step_mxfp4_aqn_run_logs_sigma_reward_and_eval(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import hwnoise.cli.train  # noqa: F401  (registers the command until cli/__init__ imports it)
    from hwnoise.aqn import StagedDecay
    from hwnoise.cli import app
    from hwnoise.rl import TrainConfig

    monkeypatch.chdir(EXAMPLE.parents[1])
    run_dir = tmp_path / "run"
    overrides = ["steps=6", "data.n_train=12", "data.n_eval=4", "algorithm.max_completion_length=24",
                 "eval.max_new_tokens=16", "eval.every=3", "eval.at_start=false", "logging.save_steps=0"]
    result = CliRunner().invoke(app, ["train", str(EXAMPLE), *overrides, "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "Held-out accuracy" in result.output

    config = TrainConfig.from_yaml(run_dir / "hwnoise_config.yaml")
    assert config.emulation.rollout == "weights:mxfp4" and config.aqn.enabled and config.steps == 6
    schedule = StagedDecay(config.aqn.sigma_start, config.aqn.sigma_end, stages=config.aqn.stages)

    logged = scalars(run_dir / "tensorboard")
    # TensorBoard step k is logged after optimizer step k; its rollout ran at global step k - 1.
    sigma = logged["train/aqn/sigma"]
    assert [s for s, _ in sigma] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in sigma] == pytest.approx([schedule.sigma_at(k - 1, 6) for k in range(1, 7)], rel=1e-6)
    assert len({round(v, 9) for _, v in sigma}) >= 3  # warm-up zeros and a decay, not one constant
    assert len(logged["train/reward"]) == 6
    assert [s for s, _ in logged["train/eval/accuracy_strict"]] == [3, 6]
    run = json.loads((run_dir / "run.json").read_text())
    reported = [e["report"]["settings"][0]["accuracy"]["flexible"] for e in run["evals"]]  # points
    assert [v for _, v in logged["train/eval/accuracy_flexible"]] == pytest.approx(reported)
    effective = dict(logged["train/aqn/effective_std"])
    assert all(effective[k] == 0 for k, v in sigma if v == 0)
    assert all(abs(effective[k] / v - 1) < 0.2 for k, v in sigma if v > 0)  # the noise the model saw
    assert all(v == 210 for _, v in logged["train/rollout/weights_quantized"])

    assert run["status"] == "finished" and run["steps"] == 6
    assert [e["step"] for e in run["evals"]] == [3, 6]
    assert run["evals"][-1]["report"]["n"] == 4
