"""The TRL integration on a tiny Llama built here (the bundled tokenizer, random weights, 2 layers).

What must hold: AQN noise and the rollout emulation are on during generation and off during the
loss forward and evaluation; the weights are clean after training and after a crash; a run
interrupted at step 3 and resumed replays the sigma sequence, the noise and the data order of an
uninterrupted run.
"""

import json

import pytest
import torch

import hwnoise
from hwnoise.inject import current_phase
from hwnoise.rl import TrainConfig, train
from hwnoise.rl.callbacks import EvalCallback, StopAtStep, read_evals

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tokenizer():
    import hwnoise.models

    _, tok = hwnoise.models.load("default")
    return tok


def tiny_model(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_config(tmp_path, name="run", **overrides):
    data = {
        "run_dir": str(tmp_path / name), "steps": 4, "seed": 0,
        "data": {"train": "arith:level=1", "n_train": 16, "n_eval": 2},
        "algorithm": {"num_generations": 2, "batch_size": 2, "max_completion_length": 8},
        "eval": {"max_new_tokens": 4, "batch_size": 2},
        "logging": {"report_to": ["none"]},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    return TrainConfig.from_dict(data)


def varied_reward(completions, **kwargs):
    """A deterministic reward that differs between completions, so advantages (and gradients) are nonzero
    even for a random model that never answers correctly."""
    return [float(len(str(c)) % 7) for c in completions]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bit_identical(model, before):
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    changed = [name for name, p in after.items() if not torch.equal(p.detach(), before[name])]
    assert not changed, f"parameters differ from the start: {changed[:5]}"


def hooked_noise_sites(model):
    """Linear and norm modules that still carry forward hooks (TRL's own hook sits on the embedding)."""
    from hwnoise.select import select_modules

    sites = select_modules(model, ["linear", "rmsnorm"], default_exclude=False)
    return [name for name, m in sites.items() if m._forward_pre_hooks or m._forward_hooks]


class Recorder:
    """Forward pre-hooks on one RMSNorm and one linear: the phase and what their weights were."""

    def __init__(self, model, fmt):
        layer = model.model.layers[0]
        self.norm, self.linear = layer.input_layernorm, layer.self_attn.q_proj
        self.clean_norm = self.norm.weight.detach().clone()
        self.clean_linear = self.linear.weight.detach().clone()
        self.quantized_linear = hwnoise.quantize(self.clean_linear, fmt)
        assert not torch.equal(self.quantized_linear, self.clean_linear)
        self.evaluating = False
        self.records = []  # (context, norm clean?, linear clean?, linear quantized?)
        self.handles = [self.norm.register_forward_pre_hook(self._norm_hook),
                        self.linear.register_forward_pre_hook(self._linear_hook)]

    def context(self):
        return "eval" if self.evaluating else current_phase()

    def _norm_hook(self, module, args):
        self._norm_clean = torch.equal(module.weight.detach(), self.clean_norm)

    def _linear_hook(self, module, args):
        w = module.weight.detach()
        self.records.append((self.context(), self._norm_clean, torch.equal(w, self.clean_linear),
                             torch.equal(w, self.quantized_linear)))

    def by_context(self, name):
        return [r[1:] for r in self.records if r[0] == name]

    def remove(self):
        for h in self.handles:
            h.remove()


def test_noise_and_emulation_only_during_generation(tokenizer, tmp_path, monkeypatch):
    model = tiny_model(tokenizer)
    before = snapshot(model)
    recorder = Recorder(model, "mxfp4")
    original_evaluate = EvalCallback.evaluate

    def evaluate(self, step):
        recorder.evaluating = True
        try:
            return original_evaluate(self, step)
        finally:
            recorder.evaluating = False

    monkeypatch.setattr(EvalCallback, "evaluate", evaluate)
    # Constant sigma: noisy from the first rollout on; lr 0: the clean weights never move.
    config = tiny_config(tmp_path, steps=2, aqn__enabled=True, aqn__schedule="constant", aqn__sigma_start=0.05,
                         emulation__rollout="weights:mxfp4", algorithm__learning_rate=0.0,
                         eval__at_start=True, eval__settings=["clean", "rollout"])
    run_dir = train(config, model=model, tokenizer=tokenizer)
    recorder.remove()

    rollout, training, evaluation = (recorder.by_context(c) for c in ("rollout", "training", "eval"))
    assert rollout and training and evaluation
    # Generation: norm weights noisy, linear weights exactly the MXFP4 quantization of the clean ones.
    assert all(not norm_clean and not lin_clean and lin_quantized for norm_clean, lin_clean, lin_quantized in rollout)
    # Loss forward (and TRL's other policy forwards): exactly the clean weights.
    assert all(norm_clean and lin_clean for norm_clean, lin_clean, _ in training)
    # Evaluation: clean weights for the clean setting; the 'rollout' setting quantizes, AQN stays out.
    assert all(norm_clean for norm_clean, _, _ in evaluation)
    assert any(lin_clean for _, lin_clean, _ in evaluation) and any(q for _, _, q in evaluation)
    assert all(lin_clean or lin_quantized for _, lin_clean, lin_quantized in evaluation)
    assert_bit_identical(model, before)
    assert not hooked_noise_sites(model)  # the emulation's hooks are gone

    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["steps"] == 2
    evals = read_evals(run_dir)
    assert [e["step"] for e in evals] == [0, 2]
    assert [s["spec"] for s in evals[-1]["report"]["settings"]] == ["clean", "weights:mxfp4"]
    assert (run_dir / "evals" / "step-000002" / "records.jsonl").is_file()  # per-problem, for paired reports
    from hwnoise.rl.runs import summarize_runs

    row = summarize_runs([run_dir])["runs"][0]  # `hwnoise report` reads what train wrote
    assert row["status"] == "finished" and row["steps"] == 2 and row["evals"] == 2
    logged = [h for h in run["log_history"] if "aqn/sigma" in h]
    assert [h["aqn/sigma"] for h in logged] == [0.05, 0.05]
    assert all(h["aqn/effective_std"] > 0.04 for h in logged)
    assert all(h["rollout/weights_quantized"] == 14 for h in logged)  # 2 layers x 7 linears


def test_weights_are_clean_after_a_crash_inside_a_rollout(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    before = snapshot(model)
    norm = model.model.layers[1].post_attention_layernorm
    seen = []

    def crash(module, args):
        if current_phase() == "rollout":
            seen.append(torch.equal(module.weight.detach(), before["model.layers.1.post_attention_layernorm.weight"]))
            if len(seen) == 3:
                raise RuntimeError("injected crash inside the rollout")

    handle = norm.register_forward_pre_hook(crash)
    config = tiny_config(tmp_path, aqn__enabled=True, aqn__schedule="constant", aqn__sigma_start=0.05,
                         emulation__rollout="weights:nvfp4", algorithm__learning_rate=0.0)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(config, model=model, tokenizer=tokenizer)
    handle.remove()
    assert seen == [False, False, False]  # the crash hit noisy weights
    assert_bit_identical(model, before)  # AQN restored, the quantized weights swapped back
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert not hooked_noise_sites(model)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed" and "injected crash" in run["error"]


def _traced_run(tokenizer, tmp_path, name, stop_at=None, resume=None):
    """Train the 6-step config; return [(step, problem ids, completions, AQN noise of a norm)]."""
    model = tiny_model(tokenizer)
    holder = {}
    trace = []

    def record(prompts, completions, id, **kwargs):
        step = holder["trainer"].state.global_step
        trace.append(("batch", step, tuple(id), tuple(str(c) for c in completions)))
        return varied_reward(completions)

    norm = model.model.layers[0].post_attention_layernorm

    def noise(module, args):
        if current_phase() == "rollout" and not holder.get("noted"):
            holder["noted"] = True
            trace.append(("noise", holder["trainer"].state.global_step, float(module.weight.double().sum())))

    handle = norm.register_forward_pre_hook(noise)

    class ClearNote(StopAtStep):
        def on_step_begin(self, args, state, control, **kwargs):
            holder["noted"] = False

    config = tiny_config(tmp_path, name, steps=6, aqn__enabled=True, aqn__stages=3, aqn__sigma_start=0.05,
                         aqn__sigma_end=0.01, algorithm__learning_rate=1e-3, logging__save_steps=3,
                         data__n_train=12)
    callbacks = [ClearNote(stop_at if stop_at is not None else 10**9)]
    run_dir = train(config, model=model, tokenizer=tokenizer, reward_funcs=[record], callbacks=callbacks,
                    resume=resume, trainer_hook=lambda t: holder.update(trainer=t))
    handle.remove()
    history = json.loads((run_dir / "run.json").read_text())["log_history"]
    sigmas = [(h["step"], h["aqn/sigma"]) for h in history if "aqn/sigma" in h]
    return trace, sigmas, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_at_step_3_replays_sigma_noise_and_data_order(tokenizer, tmp_path):
    whole, whole_sigmas, whole_params = _traced_run(tokenizer, tmp_path, "whole")
    first, _, _ = _traced_run(tokenizer, tmp_path, "split", stop_at=3)
    assert (tmp_path / "split" / "checkpoint-3").is_dir()
    second, split_sigmas, split_params = _traced_run(tokenizer, tmp_path, "split", resume="latest")

    # The schedule: 6 steps in 3 stages -> warm-up, 0.05, 0.05, then 0.01.
    schedule = hwnoise.aqn.StagedDecay(0.05, 0.01, stages=3)
    assert whole_sigmas == [(s + 1, schedule.sigma_at(s, 6)) for s in range(6)]
    assert split_sigmas == whole_sigmas
    steps = [entry[1] for entry in whole if entry[0] == "batch"]
    assert steps == list(range(6))
    # Problem ids, sampled completions and the AQN draw of each step: the resumed run is the same run.
    assert first + second == whole
    assert len({entry[2] for entry in whole if entry[0] == "batch"}) > 1  # the batches do differ
    start = snapshot(tiny_model(tokenizer))
    assert any(not torch.equal(value, start[name]) for name, value in whole_params.items())  # it did train
    for name, value in whole_params.items():
        assert torch.equal(value, split_params[name]), name


def test_lora_trains_only_the_adapters_under_mxfp4_rollouts_and_aqn(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    before = snapshot(model)
    config = tiny_config(tmp_path, steps=2, finetune="lora", lora__rank=4, lora__targets=["q_proj", "v_proj"],
                         aqn__enabled=True, aqn__schedule="constant", aqn__sigma_start=0.05,
                         emulation__rollout="weights:mxfp4", algorithm__learning_rate=1e-2)
    holder = {}
    run_dir = train(config, model=model, tokenizer=tokenizer, reward_funcs=[varied_reward],
                    trainer_hook=lambda t: holder.update(trainer=t))
    peft_model = holder["trainer"].model
    adapters = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert any(not torch.equal(p.detach(), torch.zeros_like(p)) for n, p in adapters.items() if "lora_B" in n)
    # The base weights (norms included) are frozen, and no AQN noise or quantized copy is left on them.
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in peft_model.named_parameters() if "lora_" not in n}
    assert set(base) == set(before)
    assert all(torch.equal(p.detach(), before[n]) for n, p in base.items())
    history = json.loads((run_dir / "run.json").read_text())["log_history"]
    quantized = [h["rollout/weights_quantized"] for h in history if "rollout/weights_quantized" in h]
    assert quantized == [14, 14]  # the base linears of both layers; the adapters stay in full precision
    assert [h["aqn/sigma"] for h in history if "aqn/sigma" in h] == [0.05, 0.05]


def test_training_phase_noise_reaches_the_loss_forward_and_its_backward(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    phases = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: phases.append(current_phase()))
    config = tiny_config(tmp_path, steps=2, emulation__training="relative:0.05@ops",
                         algorithm__gradient_checkpointing=False)
    run_dir = train(config, model=model, tokenizer=tokenizer)
    handle.remove()
    assert {"rollout", "training"} <= set(phases)
    history = json.loads((run_dir / "run.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2
    assert all(h["training/noisy_op_calls"] > 0 for h in steps)  # the loss forward went through noisy ops
    assert not any("rollout/noisy_op_calls" in h for h in steps)  # training-only: rollouts are clean


def test_each_training_forward_of_a_step_draws_its_own_noise(tokenizer, tmp_path, monkeypatch):
    """Two micro-batches per step: their loss forwards must not reuse one noise stream."""
    from hwnoise.emulation import Emulation

    keys = []
    original = Emulation.applied

    def spy(self, model, seed=0, step=0, *, grad=False, substep=0):
        if grad:
            keys.append((step, substep))
        return original(self, model, seed=seed, step=step, grad=grad, substep=substep)

    monkeypatch.setattr(Emulation, "applied", spy)
    config = tiny_config(tmp_path, steps=2, emulation__training="relative:0.05@ops",
                         algorithm__gradient_checkpointing=False,
                         algorithm__gradient_accumulation_steps=2)
    train(config, model=tiny_model(tokenizer), tokenizer=tokenizer)
    assert [s for s, _ in keys] == [0, 0, 1, 1]
    assert len(set(keys)) == len(keys)  # (step, substep) never repeats: independent draws


def test_epoch_aware_aqn_restarts_its_schedule_each_epoch(tokenizer, tmp_path):
    # 4 problems, 1 prompt (2 completions) per step: 4 steps per epoch, 2 epochs.
    config = tiny_config(tmp_path, steps=None, epochs=2, data__n_train=4, aqn__enabled=True,
                         aqn__schedule="epoch_aware", aqn__stages=2, aqn__sigma_start=0.04, aqn__sigma_end=0.01)
    run_dir = train(config, model=tiny_model(tokenizer), tokenizer=tokenizer)
    history = json.loads((run_dir / "run.json").read_text())["log_history"]
    sigmas = [h["aqn/sigma"] for h in history if "aqn/sigma" in h]
    schedule = hwnoise.aqn.EpochAwareDecay(0.04, 0.01, stages_per_epoch=2)
    assert sigmas == pytest.approx([schedule.sigma_at(s, 8, 4) for s in range(8)])
    assert sigmas == pytest.approx([0, 0, 0.04, 0.04, 0, 0, 0.02, 0.02])  # each epoch opens at sigma 0
