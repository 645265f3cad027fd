"""benchmarks/findings.py --train (F5): argument checks, the runs' configs (each differs from the
baseline only in its condition and AQN), the zero-shot problem files, the views from train.json alone,
and the whole recipe end to end on the bundled model in quick mode (4 steps, 4 problems, 8 tokens):
the outputs' structure, each run's condition really applied (from TRL's log and the evaluation
records), and a rerun that retrains nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import findings  # noqa: E402


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")


# -- arguments and configs (fast) --------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--train-runs", "baseline,aqn"], "--train-runs: expected a subset of baseline,noise,noise+aqn,mxfp4,mxfp4+aqn"),
    (["--train-lr", "0"], "--train-lr must be > 0; got 0"),
    (["--pilot-lrs", "1e-4,x"], "--pilot-lrs: expected comma-separated learning rates > 0; got '1e-4,x'"),
    (["--train-budget-min", "-1"], "--train-budget-min must be > 0; got -1"),
    (["--train-engine", "sglang"], "--train-engine must be 'hf' or 'vllm'; got 'sglang'"),
    (["--train-engine", "vllm"], "--train-engine vllm: the runs noise,noise+aqn train under operator noise"),
    (["--train-finetune", "half"], "--train-finetune must be 'lora' or 'full'; got 'half'"),
    (["--train-tokens", "0"], "--train-tokens must be >= 1; got 0"),
])
def test_bad_train_arguments_are_refused(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        findings.parse_args(["--out", "x", "--train"] + argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_runs_differ_from_the_baseline_only_in_their_condition_and_aqn(tmp_path):
    args = findings.parse_args(["--out", str(tmp_path), "--train", "--quick"])
    configs = dict(findings.train_configs(args, tmp_path))
    assert tuple(configs) == findings.TRAIN_RUNS
    base = configs["baseline"]
    assert base.emulation.rollout is None and base.emulation.training is None and not base.aqn.enabled
    assert base.finetune == "lora" and base.reward.mode == "flexible" and base.reward.format_bonus > 0
    assert base.reward.bonus_only_if_correct  # a bonus for the form alone was learned as '#### <any number>'
    assert 1e-4 <= base.algorithm.learning_rate <= 5e-4  # a LoRA learning rate
    noise, mx = configs["noise"], configs["mxfp4"]
    assert noise.emulation.rollout == noise.emulation.training == "relative:0.05@ops"  # forward and backward
    assert mx.emulation.rollout == "weights:mxfp4" and mx.emulation.training is None
    for name in ("noise+aqn", "mxfp4+aqn"):
        c = configs[name]
        assert c.aqn.enabled and c.aqn.schedule == "epoch_aware" and tuple(c.aqn.targets) == ("rmsnorm",)
        assert c.emulation == configs[name.split("+")[0]].emulation
    for c in configs.values():
        assert (c.data, c.algorithm, c.epochs, c.lora, c.seed) == (base.data, base.algorithm, 2, base.lora, 0)
    assert len({c.run_dir for c in configs.values()}) == 5
    assert sum(1 for _ in open(base.data.train)) == base.data.n_train == 2  # 1 prompt x 2 steps, 2 epochs
    # the pilot stage: baseline runs at the pilot's learning rates, in their own folders
    pilot = findings.pilot_configs(findings.parse_args(["--out", str(tmp_path), "--train", "--quick",
                                                        "--pilot-lrs", "1e-4,5e-4"]), tmp_path)
    assert [lr for lr, _ in pilot] == [1e-4, 5e-4] and all(c.steps == 1 and not c.aqn.enabled for _, c in pilot)
    gpu = findings.train_settings(findings.parse_args(["--out", str(tmp_path), "--train", "--device", "cuda"]))
    assert gpu["n_eval"] >= 400 and gpu["prompts_per_step"] * gpu["group"] == 64


def test_problem_files_are_zero_shot_and_held_out(tmp_path):
    from hwnoise.data import load_problems

    info = findings.write_train_problems(tmp_path, "arith:level=1", n_train=160, n_eval=200)
    train, held = load_problems(info["train"]), load_problems(info["eval"])
    stream = load_problems("arith:level=1", n=160, split="train")
    assert [p.question for p in train] == [p.question + findings.TRAIN_SUFFIX for p in stream]
    assert all(p.question.count("Question:") == 0 for p in train + held)  # no worked examples
    assert not {p.question for p in held} & {p.question for p in train} and len(held) == 200
    assert [p.gold for p in train] == [p.gold for p in stream]


def test_budget_callback_stops_and_saves_once_spent():
    from types import SimpleNamespace

    spent = findings._Budget(1e-9)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    spent.callback().on_step_end(None, None, control)
    assert control.should_training_stop and control.should_save
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    findings._Budget(None).callback().on_step_end(None, None, control)
    assert not control.should_training_stop and not findings._Budget(60).spent()


# -- the recipe end to end (bundled model) -----------------------------------------------------

RUNS = "baseline,noise+aqn,mxfp4"  # noise in rollout + training with AQN, and MXFP4 rollouts


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("f5")
    argv = ["--out", str(out), "--train", "--quick", "--threads", "1", "--train-runs", RUNS]
    with pytest.MonkeyPatch.context() as mp:  # module scope: the function-level _eager is not active yet
        mp.setenv("HWNOISE_COMPILE", "0")
        assert findings.main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_quick_recipe_writes_every_part(recipe):
    out, _ = recipe
    data = json.loads((out / "train.json").read_text())
    specs = ["clean", "relative:0.05@ops", "weights:mxfp4"]
    assert sorted(data["start"]) == sorted(specs)
    assert [r["name"] for r in data["runs"]] == RUNS.split(",") and not data["incomplete"]
    [pilot] = data["pilot"]
    assert pilot["lr"] == 3e-4 and pilot["steps"] == 1 and data["learning_rate"] == 3e-4
    for r in data["runs"]:
        assert r["steps"] == 4 and sorted(r["end"]) == sorted(specs)
        assert r["learning"]["n"] == 4 and len(r["learning"]["ci"]) == 2
        assert len(r["curves"]["reward"]) == 4 and r["curves"]["eval/accuracy_strict"][-1][0] == 4
        for spec in specs:  # every part wrote its own result: the end model's records, 4 per setting
            assert len(findings._correct_by_setting(out / "train" / r["name"] / "end-eval")[spec]) == 4
    conds = {(c["condition"], c["evaluated"], c["a"], c["b"]) for c in data["comparisons"]}
    assert ("noise", "relative:0.05@ops", "baseline", "noise+aqn") in conds
    assert ("mxfp4", "weights:mxfp4", "baseline", "mxfp4") in conds
    assert all("verdict" in c and "n_needed" in c for c in data["comparisons"])
    assert data["verdict"]["baseline_learns"].startswith(("as claimed", "opposite", "inconclusive"))
    md = (out / "train.md").read_text()
    assert "| baseline | 4 |" in md and "Pilot" in md and "Paired at the end" in md
    assert (out / "f5_curves.png").stat().st_size > 5000


@pytest.mark.slow
def test_each_run_really_trained_under_its_condition(recipe):
    """What each run applied, from TRL's log (the emulation's own statistics, AQN's sigma) and from
    the evaluation records: the baseline logged none of it."""
    out, _ = recipe
    runs = {r["name"]: r for r in json.loads((out / "train.json").read_text())["runs"]}
    applied = {n: {k.split("/")[0] for k in r["curves"] if k.startswith(findings.APPLIED_PREFIXES)}
               for n, r in runs.items()}
    assert applied["baseline"] == set()
    assert applied["noise+aqn"] == {"rollout", "training", "aqn"}  # noise in rollout and in the loss pass
    assert applied["mxfp4"] == {"rollout"}  # rollouts only
    assert max(v for _, v in runs["noise+aqn"]["curves"]["aqn/sigma"]) > 0
    assert runs["noise+aqn"]["emulation"] == {"rollout": "relative:0.05@ops", "training": "relative:0.05@ops"}
    assert runs["mxfp4"]["aqn"] is False and runs["noise+aqn"]["aqn"]["schedule"] == "epoch_aware"
    # the same seed and data: a condition that did nothing would log the baseline's numbers
    key = lambda r: [v for _, v in r["curves"]["loss"]] + [v for _, v in r["curves"]["entropy"]]  # noqa: E731
    assert key(runs["noise+aqn"]) != key(runs["baseline"]) and key(runs["mxfp4"]) != key(runs["baseline"])
    # the evaluation under a condition really ran under it: the start's greedy texts change
    from hwnoise.eval.core import read_records

    records = read_records(out / "train" / "evals" / "start" / "records.jsonl")
    text = {spec: [records[k]["completion"] for k in sorted(k for k in records if k[0] == spec)]
            for spec in ("clean", "relative:0.05@ops", "weights:mxfp4")}
    assert text["relative:0.05@ops"] != text["clean"] and text["weights:mxfp4"] != text["clean"]


@pytest.mark.slow
def test_rerun_retrains_and_re_evaluates_nothing(recipe, monkeypatch):
    out, argv = recipe
    before = json.loads((out / "train.json").read_text())

    def refuse(*a, **k):
        raise AssertionError("a finished part was run again")

    import hwnoise.rl

    monkeypatch.setattr(hwnoise.rl, "train", refuse)
    monkeypatch.setattr(findings, "_end_model", refuse)
    assert findings.main(argv) == 0
    after = json.loads((out / "train.json").read_text())
    assert after["runs"] == before["runs"] and after["comparisons"] == before["comparisons"]
    assert after["pilot"][0]["learning"] == before["pilot"][0]["learning"]


@pytest.mark.slow
def test_a_run_stopped_by_the_budget_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """The budget runs out after the first step: the run stops with a checkpoint there, train.json names
    it incomplete; the same command again continues from that checkpoint to the last step."""
    calls = []

    def spent(self):  # False when the run is about to start, True at the end of its first step
        calls.append(1)
        return len(calls) == 2

    monkeypatch.setattr(findings._Budget, "spent", spent)
    argv = ["--out", str(tmp_path), "--train", "--quick", "--threads", "1", "--train-runs", "baseline",
            "--train-lr", "3e-4", "--train-budget-min", "60"]
    assert findings.main(argv) == 0
    data = json.loads((tmp_path / "train.json").read_text())
    assert data["incomplete"] == ["baseline"] and data["runs"] == [] and data["pilot"] == []
    state = json.loads((tmp_path / "train" / "baseline" / "run.json").read_text())
    assert (state["steps"], state["max_steps"]) == (1, 4)
    assert (tmp_path / "train" / "baseline" / "checkpoint-1").is_dir()
    monkeypatch.setattr(findings._Budget, "spent", lambda self: False)
    assert findings.main(argv) == 0
    state = json.loads((tmp_path / "train" / "baseline" / "run.json").read_text())
    assert state["steps"] == 4 and state["resumed_from"].endswith("checkpoint-1")
    data = json.loads((tmp_path / "train.json").read_text())
    assert not data["incomplete"] and [r["name"] for r in data["runs"]] == ["baseline"]


@pytest.mark.slow
def test_flexible_figures_recount_from_the_completions(recipe):
    """train.json's second metric is the flexible answer of the same greedy completions: recounted here
    from each record's completion text and the problem file's gold, through hwnoise.rewards."""
    from hwnoise.data import load_problems
    from hwnoise.rewards import is_correct

    out, _ = recipe
    data = json.loads((out / "train.json").read_text())
    gold = {p.id: p.gold for p in load_problems(out / "train" / "problems" / findings.TRAIN_EVAL_FILE)}
    for r in data["runs"]:
        rows = [json.loads(line) for line in (out / "train" / r["name"] / "end-eval" / "records.jsonl").open()]
        for spec, value in r["end_flexible"].items():
            mine = [is_correct(x["completion"], gold[x["problem_id"]], "flexible") for x in rows if x["setting"] == spec]
            assert len(mine) == 4 and value == pytest.approx(100.0 * sum(mine) / 4)
        assert r["learning_flexible"]["n"] == 4
    assert all(c["flexible"]["verdict"] for c in data["comparisons"])
    assert "baseline_learns_flexible" in data["verdict"]
    assert "flexible: the same" in (out / "train.md").read_text()
