"""Must-show 2: over 6 simulated steps with a validation between steps 3 and 4, the rollout
engine's norm weights carry fresh noise of the scheduled sigma at each step, are bit-clean during
validation, and are bit-equal to the clean weights after the run; with adapter-only syncs too.

verl's real trainer class (``HwnoiseTrainer``, a ``PPOTrainerSync``) is built with ``__new__`` and
``SimpleNamespace`` fakes, as verl's own CPU tests do; its hooks are called in the order verl's
``PPOTrainer.fit`` calls them (trainer_base.py: on_init_end at setup, then per step: rollout,
on_sample_end, update, on_step_end, validation between on_validate_begin/_end). The rollout
"engine" is a tiny HF Llama behind ``HwnoiseWorkerExtension`` built on a fake vLLM worker.
"""

from types import SimpleNamespace

import pytest
import torch
from _verl_models import tiny_llama
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from hwnoise.integrations.verl.config import validate
from hwnoise.integrations.verl.trainer import HwnoiseTrainer
from hwnoise.integrations.verl.vllm_ext import RolloutNormNoise, make_worker_extension

R = "+actor_rollout_ref.rollout.custom.hwnoise"
STEPS, STEPS_PER_EPOCH = 6, 4
# Epoch-aware staged decay, 0.02 -> 0.005 over E = 2 epochs (4 steps, then 2), K = 3 stages per epoch:
# sigma_e = 0.02 * 0.25 ** (e / 2) = 0.02, 0.01, 0.005; within an epoch of length L, step t is in
# stage floor(3 t / L): stage 0 is the warm-up (0), stage 1 sigma_e, stage 2 sigma_{e+1}.
# verl's rollout of step s is schedule step s - 1: epoch 0 = steps 1-4, epoch 1 = steps 5-6.
EXPECTED_SIGMA = {1: 0.0, 2: 0.0, 3: 0.02, 4: 0.01, 5: 0.0, 6: 0.01}


class FakeVllmWorker:
    """What HwnoiseWorkerExtension needs of vLLM's worker + verl's vLLMColocateWorkerExtension."""

    def __init__(self, model):
        self.model_runner = SimpleNamespace(model=model)
        self.inbox = []
        self.adapters = {}

    def update_weights_from_ipc(self, peft_config=None, base_sync_done=False, use_shm=False):
        self._update_weights(self.inbox, peft_config, base_sync_done)  # one bucket
        self.inbox = []

    def _update_weights(self, weights, peft_config, base_sync_done):
        if peft_config and base_sync_done:  # adapter-only sync: vLLM's add_lora, base weights untouched
            self.adapters = dict(weights)
            return
        params = dict(self.model_runner.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)


class FakeCheckpointManager:
    """verl's CheckpointEngineManager: sends the actor's weights to the engine (and sleeps it)."""

    def __init__(self, actor, worker, lora):
        self.actor, self.worker, self.lora = actor, worker, lora
        self.calls, self.syncs = [], 0

    def update_weights(self, global_steps=None):
        self.calls.append(("update_weights", global_steps))
        if self.lora and self.syncs > 0:  # verl's LoRA path: base once, then adapters only
            self.worker.inbox = [("model.layers.0.self_attn.q_proj.lora_A.weight", torch.randn(4, 256))]
            self.worker.update_weights_from_ipc(peft_config={"r": 4}, base_sync_done=True)
        else:
            self.worker.inbox = [(n, p.detach().clone()) for n, p in self.actor.named_parameters()]
            self.worker.update_weights_from_ipc()
        self.syncs += 1

    def sleep_replicas(self):
        self.calls.append(("sleep_replicas",))  # sleep level 1: the engine keeps its (noisy) weights


class FakeEngine:
    """vLLM's AsyncLLM as verl's server holds it: collective_rpc runs ``method`` in every worker and
    returns their results; reset_prefix_cache drops cached KV blocks."""

    def __init__(self, workers, log):
        self.workers, self.log = workers, log

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.log.append((method, (kwargs or {}).get("state")))
        return [getattr(w, method)(*args, **(kwargs or {})) for w in self.workers]

    async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.log.append(("reset_prefix_cache", None))
        return True


class FakeServer:
    """verl's vLLMHttpServer actor: ``engine`` only on node rank 0 (other nodes run headless); its
    own ``collective_rpc`` discards the workers' results (vllm_async_server.py:249-261)."""

    def __init__(self, workers, log, node_rank=0):
        self.node_rank = node_rank
        if node_rank == 0:
            self.engine = FakeEngine(workers, log)
        self.__ray_call__ = SimpleNamespace(remote=lambda fn, *args: fn(self, *args))  # Ray runs fn(actor, ...)
        self.collective_rpc = SimpleNamespace(remote=self._collective_rpc)

    def _collective_rpc(self, method, kwargs=None, **_):
        import asyncio

        asyncio.run(self.engine.collective_rpc(method, kwargs=kwargs))  # AttributeError when headless, as verl's
        return None


def verl_config(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def make_trainer(lora):
    config = verl_config([f"{R}.aqn.enabled=true", f"{R}.aqn.schedule=epoch_aware", f"{R}.aqn.sigma_start=0.02",
                          f"{R}.aqn.sigma_end=0.005", f"{R}.aqn.stages=3", "+trainer.hwnoise.seed=11",
                          "trainer.v1.trainer_mode=hwnoise_sync"])
    actor, engine = tiny_llama(), tiny_llama()
    engine.load_state_dict(actor.state_dict())
    worker = make_worker_extension(FakeVllmWorker)(engine)
    engine_log = []
    trainer = HwnoiseTrainer.__new__(HwnoiseTrainer)
    trainer.config = config
    trainer.hwnoise = validate(config)
    trainer.hwnoise_state = trainer.hwnoise_rollout_state = None
    trainer.global_steps, trainer.total_training_steps, trainer.steps_per_epoch = 0, STEPS, STEPS_PER_EPOCH
    trainer.timing_raw, trainer.curr_step_profile = {}, False
    trainer.checkpoint_manager = FakeCheckpointManager(actor, worker, lora)
    trainer.hwnoise_engine_metrics = {}
    # a two-node replica: the second node's server is headless
    servers = [FakeServer([worker], engine_log), FakeServer([], engine_log, node_rank=1)]
    trainer.llm_server_manager = SimpleNamespace(get_replicas=lambda: [SimpleNamespace(servers=servers)])
    trainer.engine_log = engine_log
    return trainer, actor, engine, [(m, s) for m, s in engine_log if m == "hwnoise_set_state"]


def norms(model):
    return {n: p.detach().clone() for n, p in RolloutNormNoise.norm_weights(model).items()}


def train_step(actor, step, lora):
    if lora:
        return  # LoRA: the base weights (norms included) stay frozen
    with torch.no_grad():
        for p in RolloutNormNoise.norm_weights(actor).values():
            p.add_(1e-3 * step)  # an optimizer step moves the norms


@pytest.mark.parametrize("lora", [False, True], ids=["full-syncs", "adapter-only-syncs"])
def test_six_steps_with_validation(lora):
    trainer, actor, engine, _ = make_trainer(lora)
    trainer.on_init_end()  # verl: weights synced after loading the checkpoint
    trainer.global_steps = 1
    trainer.on_train_begin()
    seen_noise = {}
    for step in range(1, STEPS + 1):
        # rollout of this step: engine norms = actor's clean norms + noise of the scheduled sigma
        clean, rolled = norms(actor), norms(engine)
        noise = torch.cat([(rolled[n] - clean[n]).flatten() for n in clean]).double()
        sigma = EXPECTED_SIGMA[step]
        if sigma == 0:
            assert all(torch.equal(rolled[n], clean[n]) for n in clean), f"step {step}: warm-up must be bit-clean"
        else:
            assert abs(noise.std().item() / sigma - 1) < 0.1, (step, noise.std().item(), sigma)
            assert abs(noise.mean().item()) < 0.1 * sigma
            for earlier, previous in seen_noise.items():  # fresh draw each step, never a replay
                assert not torch.equal(noise, previous), (step, earlier)
            seen_noise[step] = noise
        trainer.on_sample_end()
        train_step(actor, step, lora)
        trainer.on_step_end()
        metrics = trainer._consume_sync_metrics()
        assert metrics["hwnoise/aqn/sigma"] == pytest.approx(sigma) and metrics["hwnoise/aqn/step"] == step
        # measured in the engine, for this step's rollout (issue 23, 5)
        if sigma == 0:
            assert metrics["hwnoise/aqn/effective_std"] == 0.0
        else:
            assert metrics["hwnoise/aqn/effective_std"] == pytest.approx(sigma, rel=0.1)
        assert metrics["hwnoise/aqn/engine_workers"] == 1.0
        if step == 3:
            trainer.on_validate_begin()
            clean_now = norms(actor)
            assert all(torch.equal(v, clean_now[n]) for n, v in norms(engine).items()), "validation must be clean"
            trainer.on_validate_end()
            after = norms(engine)
            assert all(not torch.equal(v, clean_now[n]) for n, v in after.items()), "noise back on after validation"
        trainer.global_steps += 1
    final_clean = norms(actor)
    assert all(torch.equal(v, final_clean[n]) for n, v in norms(engine).items()), "engine must end bit-clean"
    # verl's own hooks ran: one sync per step plus the initial one, one sleep per step
    calls = trainer.checkpoint_manager.calls
    assert calls.count(("sleep_replicas",)) == STEPS
    assert [c[1] for c in calls if c[0] == "update_weights"] == list(range(0, STEPS + 1))
    rpc_log = [(m, s) for m, s in trainer.engine_log if m == "hwnoise_set_state"]
    assert [s["active"] for m, s in rpc_log].count(False) >= 2  # validation off, and the end of the run
    assert {s["seed"] for _, s in rpc_log} == {11}


def test_prefix_cache_is_reset_after_every_aqn_state_change():
    """Clean KV from validation (or KV of the previous draw) is never reused by a noisy rollout
    (issue 23, 3): every hwnoise_set_state is followed by a prefix-cache reset."""
    trainer, actor, engine, _ = make_trainer(lora=False)
    trainer.on_init_end()
    trainer.global_steps = 1
    trainer.on_train_begin()
    for step in range(1, 4):
        trainer.on_sample_end()
        trainer.on_step_end()
        trainer._consume_sync_metrics()
        if step == 2:
            trainer.on_validate_begin()
            trainer.on_validate_end()
        trainer.global_steps += 1
    log = [m for m, _ in trainer.engine_log]
    changes = [i for i, m in enumerate(log) if m == "hwnoise_set_state"]
    assert len(changes) >= 6  # train begin, 3 steps, validation off and on
    assert all(log[i + 1] == "reset_prefix_cache" for i in changes), log
    assert log.count("reset_prefix_cache") == len(changes)  # the too-far check: only after a change


def test_headless_servers_get_nothing_and_engine_call_says_so():
    from hwnoise.integrations.verl.trainer import engine_call

    trainer, *_ = make_trainer(lora=False)
    assert trainer._hwnoise_servers() == [trainer.llm_server_manager.get_replicas()[0].servers[0]]
    headless = trainer.llm_server_manager.get_replicas()[0].servers[1]
    assert engine_call(headless, "hwnoise_set_state", {"state": {}}, True) == {"headless": True}
    with pytest.raises(AttributeError):  # what the old broadcast to every server hit
        headless.collective_rpc.remote("hwnoise_set_state", kwargs={"state": {}})


def test_weight_stream_statistics_reach_the_step_metrics():
    """The adapter's stream statistics are stored on the server actor and come back with the
    trainer's engine call into the metrics of the step that rolled out on those weights."""
    import asyncio

    from hwnoise.integrations.verl.rollout import make_server_adapter

    config = verl_config([f"{R}.emulation=weights:mxfp4", "trainer.v1.trainer_mode=hwnoise_sync"])
    server = FakeServer([], [])

    class FakeServerAdapter:  # verl's ServerAdapter: rank 0 of a replica has the server handle
        def __init__(self):
            self.config = SimpleNamespace(custom={"hwnoise": {"emulation": "weights:mxfp4"}})
            self._has_server = True

            async def remote(fn, *args):  # a Ray ObjectRef is awaitable in async actors
                return fn(server, *args)

            self.server_handle = SimpleNamespace(__ray_call__=SimpleNamespace(remote=remote))

        def _ensure_server_handle(self):
            return True

        async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
            self.received = dict(weights)

    adapter = make_server_adapter(FakeServerAdapter)()

    class Checkpoints:
        calls = []

        def update_weights(self, global_steps=None):
            w = torch.randn(64, 64, generator=torch.Generator().manual_seed(global_steps or 0))
            asyncio.run(adapter.update_weights(iter([("model.layers.0.mlp.down_proj.weight", w)]), global_steps))

    trainer = HwnoiseTrainer.__new__(HwnoiseTrainer)
    trainer.config, trainer.hwnoise = config, validate(config)
    trainer.hwnoise_state = trainer.hwnoise_rollout_state = None
    trainer.hwnoise_engine_metrics = {}
    trainer.global_steps, trainer.total_training_steps, trainer.steps_per_epoch = 0, 3, 3
    trainer.timing_raw, trainer.curr_step_profile = {}, False
    trainer.checkpoint_manager = Checkpoints()
    trainer.llm_server_manager = SimpleNamespace(get_replicas=lambda: [SimpleNamespace(servers=[server])])
    trainer.on_init_end()
    trainer.global_steps = 1
    trainer.on_train_begin()
    for step in range(1, 3):
        trainer.on_step_end()
        metrics = trainer._consume_sync_metrics()
        assert metrics["hwnoise/weights/quantized"] == 1.0
        assert 10 < metrics["hwnoise/weights/sqnr_db"] < 30, metrics  # MXFP4 of a Gaussian: ~17-20 dB
        trainer.global_steps += 1
    assert "hwnoise/aqn/effective_std" not in metrics  # no AQN asked, none reported


def test_redraw_restores_before_drawing_bf16():
    """Redrawing 50 times at one sigma from bf16 weights: the noise never accumulates, and the
    stochastic cast keeps sigma=1e-3 (below half a bf16 ulp near 1.0) on average."""
    engine = tiny_llama(torch.bfloat16)
    clean = norms(engine)
    worker = make_worker_extension(FakeVllmWorker)(engine)
    for step in range(50):
        worker.hwnoise_set_state({"step": step, "sigma": 1e-3, "seed": 0, "active": True})
    noise = torch.cat([(v.double() - clean[n].double()).flatten() for n, v in norms(engine).items()])
    assert noise.std().item() < 3e-3  # an accumulated random walk would be ~7e-3 after 50 draws
    assert (noise != 0).float().mean() > 0.05  # nearest rounding would leave all but ~0 % unchanged
    worker.hwnoise_set_state({"step": 50, "sigma": 1e-3, "seed": 0, "active": False})
    assert all(torch.equal(v, clean[n]) for n, v in norms(engine).items())


def test_same_seed_step_name_draws_the_same_noise_on_every_rank():
    a, b = tiny_llama(), tiny_llama()
    wa, wb = make_worker_extension(FakeVllmWorker)(a), make_worker_extension(FakeVllmWorker)(b)
    state = {"step": 4, "sigma": 0.01, "seed": 3, "active": True}
    wa.hwnoise_set_state(state), wb.hwnoise_set_state(dict(state))
    assert all(torch.equal(x, y) for x, y in zip(norms(a).values(), norms(b).values()))
    wb.hwnoise_set_state({**state, "step": 5})
    assert not all(torch.equal(x, y) for x, y in zip(norms(a).values(), norms(b).values()))


def test_multipliers_scale_per_layer():
    engine = tiny_llama()
    clean = norms(engine)
    worker = make_worker_extension(FakeVllmWorker)(engine)
    worker.hwnoise_set_state({"step": 1, "sigma": 0.01, "seed": 0, "active": True,
                              "multipliers": {"layer_multipliers": {"1": 3.0}, "default_multiplier": 1.0,
                                              "targeted": [1, 2]}})
    noisy = norms(engine)
    std = {n: (noisy[n] - clean[n]).std().item() for n in clean}
    assert all(std[n] == 0 for n in std if ".layers.0." in n or n == "model.norm.weight")  # untargeted
    assert all(abs(std[n] / 0.03 - 1) < 0.2 for n in std if ".layers.1." in n)
    assert all(abs(std[n] / 0.01 - 1) < 0.2 for n in std if ".layers.2." in n)


def test_init_runs_verl_as_the_sync_trainer(monkeypatch):
    """verl's branches test trainer_mode == "sync": HwnoiseTrainer validates, then runs as "sync"."""
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    seen = {}
    monkeypatch.setattr(PPOTrainerSync, "__init__", lambda self, config: seen.update(mode=config.trainer.v1.trainer_mode))
    config = verl_config([f"{R}.aqn.enabled=true", "trainer.v1.trainer_mode=hwnoise_sync"])
    trainer = HwnoiseTrainer(config)
    assert seen["mode"] == "sync" and trainer.hwnoise.aqn.enabled
    from verl.trainer.ppo.v1 import get_trainer_cls

    assert get_trainer_cls("hwnoise_sync") is HwnoiseTrainer
