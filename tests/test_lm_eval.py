"""hwnoise inside lm-eval (hwnoise.integrations.lm_eval, `hwnoise lm-eval`), offline, on the bundled model.

One CLI run (module fixture) evaluates a generation task (GSM8K from the local file, 8 documents,
lm-eval's own gsm8k prompt and metric) and a loglikelihood multiple-choice task written here (8
documents, local JSON) clean and under two settings; the tests read its output. The clean setting
is compared with lm-eval's own `hf` model on the same model and documents, and a collapsing setting
must change answers and loglikelihoods (else the emulation did not reach the model inside lm-eval).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from typer.testing import CliRunner  # noqa: E402

from hwnoise.cli import app  # noqa: E402

GSM8K = Path(os.environ.get("HWNOISE_GSM8K", "/work/shared/data/gsm8k/test.jsonl"))
N_DOCS = 8
SETTINGS = ("weights:mxfp4", "relative:1@ops")  # a realistic format, and noise that must collapse accuracy
GEN = "max_gen_toks=32"
MC_ROWS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a dog have?", ["two", "four", "six"], 1),
    ("What is 2 + 2?", ["3", "4", "5"], 1),
    ("Which animal says moo?", ["cat", "cow", "dog"], 1),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("Which is the largest?", ["an ant", "a mouse", "an elephant"], 2),
    ("What falls from clouds when it rains?", ["water", "sand", "rocks"], 0),
    ("Which season is the coldest?", ["summer", "winter", "spring"], 1),
]
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason=f"no local GSM8K file at {GSM8K} (set HWNOISE_GSM8K)")


def write_mc_task(folder: Path) -> Path:
    """A multiple-choice lm-eval task on local JSON (8 documents)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": l}) + "\n" for q, c, l in MC_ROWS))
    (folder / "tiny_mc.yaml").write_text(MC_YAML.format(data=data))
    return folder


def cli_args(out: Path, tasks_dir: Path, *extra: str) -> list[str]:
    args = ["lm-eval", "default", "--tasks", "gsm8k_local,tiny_mc", "--include-path", str(tasks_dir),
            "--gsm8k-path", str(GSM8K), "--limit", str(N_DOCS), "--num-fewshot", "0", "--gen-kwargs", GEN,
            "--threads", "1", "--out", str(out)]
    for s in SETTINGS:
        args += ["--setting", s]
    return args + list(extra)


def samples(out: Path, task: str, spec: str) -> list[dict]:
    from hwnoise.integrations.lm_eval import read_samples, setting_slug

    return read_samples(out / "samples" / task / f"{setting_slug(spec)}.jsonl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI run every slow test reads: (out dir, tasks dir, report data, wall seconds)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("lm_eval")
    tasks_dir = write_mc_task(root / "tasks")
    out = root / "out"
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, cli_args(out, tasks_dir))
    wall = time.perf_counter() - t0
    assert result.exit_code == 0, result.output + repr(result.exception)
    print(result.output)
    print(f"\nhwnoise lm-eval (2 tasks x 3 settings, {N_DOCS} docs each): {wall:.1f} s wall")
    return out, tasks_dir, json.loads((out / "lm-eval.json").read_text()), wall


@pytest.mark.slow
def test_both_kinds_of_task_clean_and_under_two_settings_with_paired_statistics(run):
    out, _, data, _ = run
    assert set(data["tasks"]) == {"gsm8k_local", "tiny_mc"}
    for task, primary in (("gsm8k_local", "exact_match,strict-match"), ("tiny_mc", "acc,none")):
        t = data["tasks"][task]
        assert t["n"] == N_DOCS and t["primary_metric"] == primary
        assert [s["spec"] for s in t["settings"]] == ["clean", *SETTINGS]
        for s in t["settings"]:
            m = s["metrics"][primary]
            assert m["kind"] == "0/1" and m["n"] == N_DOCS and m["ci"][0] <= m["value"] <= m["ci"][1]
            assert len(samples(out, task, s["spec"])) == N_DOCS * (2 if task == "gsm8k_local" else 1)  # 2 filters
        assert [c["setting"] for c in t["comparisons"]] == list(SETTINGS)
        for c in t["comparisons"]:
            # the same numbers hwnoise eval reports, from hwnoise.eval.stats on the per-document values
            from hwnoise.eval.stats import compare

            clean = {str(r["doc_id"]): r for r in samples(out, task, "clean") if r["filter"] == primary.split(",")[1]}
            other = {str(r["doc_id"]): r for r in samples(out, task, c["setting"]) if r["filter"] == primary.split(",")[1]}
            docs = sorted(clean, key=int)
            metric = primary.split(",")[0]
            ref = compare(c["setting"], [clean[d][metric] for d in docs], [other[d][metric] for d in docs], metric=primary).to_json()
            for key in ("drop", "drop_ci", "exact_drop_ci", "mcnemar_p", "b", "c", "robustness", "n_needed"):
                assert c[key] == ref[key], (task, c["setting"], key)
            assert c["robustness"] in ("robust", "moderate", "not robust", "inconclusive")
            assert set(c["by_metric"]) == set(t["metrics"])
    mc = data["tasks"]["tiny_mc"]
    assert mc["settings"][0]["metrics"]["acc,none"]["value"] > 0  # the clean model gets some right


@pytest.mark.slow
def test_collapsing_setting_reaches_the_model_inside_lm_eval(run):
    out, _, data, _ = run
    # loglikelihoods: every choice of every document moves under heavy operator noise, and the format moves some
    clean = {r["doc_id"]: r["filtered_resps"] for r in samples(out, "tiny_mc", "clean")}
    for spec, needed in (("relative:1@ops", N_DOCS), ("weights:mxfp4", 1)):
        noisy = {r["doc_id"]: r["filtered_resps"] for r in samples(out, "tiny_mc", spec)}
        moved = sum(all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(clean[d], noisy[d])) for d in clean)
        assert moved >= needed, (spec, moved)
    mc = {s["spec"]: s for s in data["tasks"]["tiny_mc"]["settings"]}
    assert mc["relative:1@ops"]["emulated_calls"] > 0 and mc["clean"]["emulated_calls"] == 0
    # generation: the answers change
    gen = lambda spec: {r["doc_id"]: r["resps"][0][0] for r in samples(out, "gsm8k_local", spec) if r["filter"] == "strict-match"}  # noqa: E731
    clean_gen, noisy_gen = gen("clean"), gen("relative:1@ops")
    assert sum(clean_gen[d] != noisy_gen[d] for d in clean_gen) >= N_DOCS - 1


@pytest.mark.slow
def test_clean_equals_lm_evals_own_hf_model_and_settings_leave_the_model_as_it_was(run, one_thread):
    import torch
    from lm_eval.models.huggingface import HFLM

    from hwnoise.integrations.lm_eval import EmulatedHFLM, gsm8k_task_yaml
    from hwnoise.integrations.lm_eval.tasks import build_task_manager
    from hwnoise.models import load

    out, tasks_dir, _, _ = run
    model, tok = load("default")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manager = build_task_manager([tasks_dir, out / "tasks"])
    assert (out / "tasks" / "gsm8k_local.yaml").read_text() == gsm8k_task_yaml(GSM8K)
    # an emulation first, in this process: what follows must not see any of it
    noisy = EmulatedHFLM(pretrained=model, tokenizer=tok, emulation="weights:mxfp4+relative:1@ops+aqn:0.05")
    with noisy.static_applied():
        lm_eval.simple_evaluate(model=noisy, tasks=["tiny_mc"], task_manager=manager, limit=2, bootstrap_iters=0)
    assert noisy.emulated_calls > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # noise keyed by the request, not by call order: 3 documents alone draw what they drew among 8
    alone = lm_eval.simple_evaluate(model=EmulatedHFLM(pretrained=model, tokenizer=tok, emulation="relative:1@ops"),
                                    tasks=["tiny_mc"], task_manager=manager, limit=3, bootstrap_iters=0, log_samples=True)
    among = {r["doc_id"]: r["resps"] for r in samples(out, "tiny_mc", "relative:1@ops")}
    assert [json.loads(json.dumps(r["resps"])) == among[r["doc_id"]] for r in alone["samples"]["tiny_mc"]] == [True] * 3
    t0 = time.perf_counter()
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks=["gsm8k_local", "tiny_mc"],
                                  task_manager=manager, limit=N_DOCS, num_fewshot=0, gen_kwargs={"max_gen_toks": 32},
                                  log_samples=True, bootstrap_iters=0)
    print(f"\nlm-eval's own hf model on the same documents: {time.perf_counter() - t0:.1f} s")
    for task in ("gsm8k_local", "tiny_mc"):
        ours = {(r["doc_id"], r["filter"]): r for r in samples(out, task, "clean")}
        theirs = {(r["doc_id"], r["filter"]): r for r in ref["samples"][task]}
        assert ours.keys() == theirs.keys()
        for key, r in theirs.items():
            r = json.loads(json.dumps(r, default=str))
            assert ours[key]["doc_hash"] == r["doc_hash"] and ours[key]["prompt_hash"] == r["prompt_hash"]
            assert ours[key]["resps"] == r["resps"] and ours[key]["filtered_resps"] == r["filtered_resps"], (task, key)
            for m in r["metrics"]:
                assert ours[key][m] == r[m]


@pytest.mark.slow
def test_rerun_skips_finished_pairs_and_a_recomputed_pair_draws_the_same_noise(run, monkeypatch):
    out, tasks_dir, data, _ = run
    from hwnoise.integrations.lm_eval import setting_slug

    # everything finished: no model is loaded, the report is the same
    import hwnoise.cli.lm_eval as cli

    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("the model was loaded for a finished run"))
    result = CliRunner().invoke(app, cli_args(out, tasks_dir))
    assert result.exit_code == 0, result.output
    assert "6 of 6 task x setting pairs already" in " ".join(result.output.split())
    again = json.loads((out / "lm-eval.json").read_text())
    assert again["tasks"] == data["tasks"]
    monkeypatch.undo()
    # one noisy pair killed before it finished: only it runs again, with the same noise
    spec = "relative:1@ops"
    kept = (out / "samples" / "tiny_mc" / f"{setting_slug(spec)}.jsonl").read_text()
    (out / "results" / "tiny_mc" / f"{setting_slug(spec)}.json").unlink()
    result = CliRunner().invoke(app, cli_args(out, tasks_dir))
    assert result.exit_code == 0, result.output
    assert "5 of 6" in " ".join(result.output.split()) and "tiny_mc under relative:1@ops" in result.output
    assert (out / "samples" / "tiny_mc" / f"{setting_slug(spec)}.jsonl").read_text() == kept
    # another limit is another run: refused, naming what differs
    result = CliRunner().invoke(app, cli_args(out, tasks_dir, "--limit", "4"))  # the last --limit counts
    assert result.exit_code == 2 and "limit: 8 there, 4 now" in " ".join(result.output.split())


def test_bad_settings_and_tasks_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    import hwnoise.cli.lm_eval as cli

    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    tasks_dir = write_mc_task(tmp_path / "tasks")
    base = ["lm-eval", "default", "--include-path", str(tasks_dir), "--out", str(tmp_path / "out")]
    bad_setting = "weights:nofmt"  # a name, not a literal after "--setting": test_spec_strings collects those
    result = CliRunner().invoke(app, base + ["--tasks", "tiny_mc", "--setting", bad_setting])
    assert result.exit_code == 2 and "nofmt" in result.output
    result = CliRunner().invoke(app, base + ["--tasks", "gsm8k_local", "--gsm8k-path", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "none.jsonl" in result.output
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, base[:-1] + [str(tmp_path / "file"), "--tasks", "tiny_mc"])
    assert result.exit_code == 2 and "existing file" in result.output
    result = CliRunner().invoke(app, base + ["--tasks", "tiny_mc", "--limit", "0"])
    assert result.exit_code == 2 and "--limit must be >= 1" in result.output


@pytest.mark.slow  # no model, but lm-eval indexes its ~15,000 bundled task files to know a name is unknown
def test_unknown_task_is_refused_before_the_model_loads_naming_close_ones(tmp_path, monkeypatch):
    import hwnoise.cli.lm_eval as cli

    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    tasks_dir = write_mc_task(tmp_path / "tasks")
    result = CliRunner().invoke(app, ["lm-eval", "default", "--include-path", str(tasks_dir), "--out", str(tmp_path / "out"),
                                      "--tasks", "tiny_mc,tiny_mcq"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "'tiny_mcq'" in text and "close: tiny_mc" in text
    assert not (tmp_path / "out" / "results").exists()


def test_noise_key_is_the_request_content_and_the_split_is_the_whole_emulation():
    import torch

    from lm_eval.api.registry import get_model

    from hwnoise.emulation import Emulation
    from hwnoise.integrations.lm_eval import REGISTERED_NAME, EmulatedHFLM, content_key, split_emulation

    assert get_model(REGISTERED_NAME) is EmulatedHFLM  # lm_eval.simple_evaluate(model="hwnoise-hf", ...) finds it

    a = torch.tensor([[1, 2, 3]])
    assert content_key("call", a, None) == content_key("call", a.clone(), None)
    assert content_key("call", a, None) != content_key("call", torch.tensor([[1, 2, 4]]), None)
    assert content_key("call", a, None) != content_key("generate", a, None)
    e = Emulation.parse("weights:mxfp4+inputs:fp8_e4m3+relative:0.05@ops+aqn:0.01+targets:*.mlp.*")
    static, dynamic = split_emulation(e)
    assert static.weight_format == "mxfp4" and static.targets == e.targets and dynamic.weight_format is None
    assert (dynamic.input_format, dynamic.error, dynamic.aqn_sigma, dynamic.targets) == ("fp8_e4m3", "relative:0.05", 0.01, e.targets)
    assert split_emulation(Emulation())[0].is_clean and split_emulation(Emulation())[1].is_clean
