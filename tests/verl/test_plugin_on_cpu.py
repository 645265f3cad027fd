"""Must-show 1 and the plugin's import failures.

A local Ray async actor, with the plugin loaded the way verl loads it (VERL_USE_EXTERNAL_MODULES
in Ray's runtime_env, then ``import verl`` in the actor's process), sees noisy ``F.linear`` in its
methods, which Ray runs on an asyncio thread; with no HWNOISE_* variable it sees clean results.
"""

import importlib
import os
import subprocess
import sys

import pytest

PLUGIN = "hwnoise.integrations.verl.plugin"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWNOISE_") and k != "VERL_USE_EXTERNAL_MODULES"}
    return {**env, **extra}


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_clean_env(**env))


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    env_vars = {"VERL_USE_EXTERNAL_MODULES": PLUGIN, "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env_vars})
    yield ray
    ray.shutdown()


def _linear_actor(ray):
    @ray.remote(num_cpus=0)
    class LinearActor:
        """An async Ray actor like verl's ActorRolloutRefWorker (its update_weights is async)."""

        def __init__(self):
            import verl  # noqa: F401  verl imports VERL_USE_EXTERNAL_MODULES here

        async def linear_error(self):
            import threading

            import torch
            import torch.nn.functional as F

            x, w = torch.ones(4, 64), torch.ones(32, 64)
            y = F.linear(x, w)
            return float((y - 64.0).abs().max()), threading.current_thread().name

    return LinearActor


def test_async_actor_methods_see_noisy_linear(ray_session):
    ray = ray_session
    noisy = _linear_actor(ray).options(runtime_env={"env_vars": {"HWNOISE_ERROR": "relative:0.05",
                                                                 "HWNOISE_SEED": "1"}}).remote()
    error, thread = ray.get(noisy.linear_error.remote())
    assert thread != "MainThread"  # the case a mode entered at import time misses
    assert error > 0.5  # 5 % relative noise on outputs of 64


def test_async_actor_without_hwnoise_variables_is_clean(ray_session):
    ray = ray_session
    clean = _linear_actor(ray).remote()
    error, _ = ray.get(clean.linear_error.remote())
    assert error == 0.0


def test_plugin_registers_the_rollout_adapter():
    run = _python("import verl\nfrom verl.workers.rollout.base import _ROLLOUT_REGISTRY as r\n"
                  "print(r[('vllm', 'async')])", VERL_USE_EXTERNAL_MODULES=PLUGIN)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "hwnoise.integrations.verl.rollout.HwnoiseServerAdapter"


def test_bad_variable_refuses_to_start_the_way_verl_loads_it():
    # verl re-raises errors of VERL_USE_EXTERNAL_MODULES at `import verl`: the worker never starts
    run = _python("import verl", VERL_USE_EXTERNAL_MODULES=PLUGIN, HWNOISE_ERROR="relatve:0.05")
    assert run.returncode != 0
    assert "HWNOISE_ERROR" in run.stderr and "relatve" in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize("env, named", [
    ({"HWNOISE_ERROR": "relative", "HWNOISE_SCALE": "five"}, "HWNOISE_SCALE"),
    ({"HWNOISE_SCALE": "0.05"}, "HWNOISE_ERROR"),
    ({"HWNOISE_ERROR": "relative:0.05", "HWNOISE_OPS": "linear,conv9"}, "HWNOISE_OPS"),
])
def test_bad_variables_make_the_plugin_import_raise(env, named, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop(PLUGIN, None)
    with pytest.raises(ValueError, match=named):
        importlib.import_module(PLUGIN)
    assert PLUGIN not in sys.modules


def test_engine_call_returns_worker_results_through_ray_call(ray_session):
    """verl's vLLMHttpServer.collective_rpc returns None; hwnoise's engine_call, run on the server
    actor with Ray's __ray_call__ (on an actor thread), awaits the engine on the actor's own event
    loop and returns every worker's result (issue 23, 5). An async actor shaped like the server:
    the engine client is made inside an async method and a uvicorn-like task runs on that loop."""
    ray = ray_session
    from hwnoise.integrations.verl.trainer import engine_call

    @ray.remote(num_cpus=0)
    class Server:
        node_rank = 0

        async def launch(self):
            import asyncio

            loop = asyncio.get_running_loop()

            class Engine:  # AsyncLLM: usable only from the loop it was made on
                async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
                    assert asyncio.get_running_loop() is loop
                    return [{"worker": i, "method": method, **(kwargs or {})} for i in range(2)]

                async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
                    assert asyncio.get_running_loop() is loop
                    return True

            self.engine = Engine()
            self._server_task = asyncio.create_task(asyncio.sleep(3600))  # verl: run_uvicorn's task

        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):  # verl's: discards
            await self.engine.collective_rpc(method=method, timeout=timeout, args=args, kwargs=kwargs)

    server = Server.remote()
    ray.get(server.launch.remote())
    assert ray.get(server.collective_rpc.remote("hwnoise_stats")) is None
    out = ray.get(server.__ray_call__.remote(engine_call, "hwnoise_stats", {"x": 1}, True))
    assert out["workers"] == [{"worker": 0, "method": "hwnoise_stats", "x": 1},
                              {"worker": 1, "method": "hwnoise_stats", "x": 1}]
    assert out["prefix_cache_reset"] is True and out["stream"] is None
