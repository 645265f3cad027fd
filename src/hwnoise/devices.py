"""Devices and dtypes by name: ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")``,
``resolve_dtype("auto" | "bf16" | "fp16" | "fp32")``, and where a (possibly spread) model lives.

A bad name or a device that does not exist here is a ``ValueError`` naming what would be
accepted and the devices that exist on this machine.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = [
    "DEVICE_MAPS",
    "DEVICES",
    "DTYPES",
    "available_devices",
    "input_device",
    "model_devices",
    "place",
    "resolve_device",
    "resolve_dtype",
]

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
# "auto" is the checkpoint's own dtype (config.torch_dtype; fp32 when it names none).
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
# None: the whole model on one device; "auto": spread over the visible GPUs by accelerate.
DEVICE_MAPS = (None, "auto")
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def available_devices() -> list[str]:
    """The devices that exist here, as ``resolve_device`` accepts them: ``cpu``, ``cuda:0`` ..."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


def _exists_here() -> str:
    return f"devices here: {', '.join(available_devices())}"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the current CUDA device when CUDA is present, else the CPU; ``cpu``;
    ``cuda`` (the current CUDA device); ``cuda:N``. Raises ValueError for a name it does not know
    or a device that does not exist here, naming the devices that do."""
    if isinstance(device, torch.device):
        text = str(device)
    elif device is None:
        text = "auto"
    elif isinstance(device, str):
        text = device.strip().lower()
    else:
        raise ValueError(f"device must be a string such as 'cuda:0' or a torch.device; got {device!r}")
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_INDEX.match(text)
    if text == "cuda" or match:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine ({_exists_here()})")
        index = int(match.group(1)) if match else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there is no CUDA device {index} ({_exists_here()})")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)} ({_exists_here()})")


def resolve_dtype(dtype: str | torch.dtype | None = "auto") -> torch.dtype | None:
    """``auto`` (or None) -> None, meaning the checkpoint's own dtype; ``bf16``, ``fp16``, ``fp32``
    (or the torch dtype) -> that dtype. ValueError for anything else, naming what is accepted."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; expected one of {', '.join(DTYPES)}")
        return dtype
    if isinstance(dtype, str):
        text = dtype.strip().lower()
        text = _DTYPE_ALIASES.get(text, text)
        if text in DTYPES:
            return DTYPES[text]
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def check_device_map(device_map) -> None:
    """Only None and "auto" are offered (a dict is accelerate's own business)."""
    if device_map not in DEVICE_MAPS and not isinstance(device_map, dict):
        raise ValueError(f"unknown device_map {device_map!r}; expected 'auto' (spread over the visible GPUs) or none")


def model_devices(model: nn.Module) -> set[torch.device]:
    """Every device a parameter or buffer of ``model`` lives on."""
    return {t.device for t in (*model.parameters(), *model.buffers())}


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device (the first device of a model
    spread by a device map), else its first parameter's, else the CPU."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = None
    if callable(get):
        try:
            embedding = get()
        except NotImplementedError:
            embedding = None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def place(model: nn.Module, device=None, dtype=None) -> nn.Module:
    """Move ``model`` (in place, like ``Trainer`` does) to ``device`` and cast it to ``dtype``; None
    (or "auto") leaves that as it is. A model spread over several devices by a device map is not
    moved: asking to is an error naming its devices."""
    target = None if device is None or device == "auto" else resolve_device(device)
    cast = resolve_dtype(dtype)
    if target is not None:
        here = model_devices(model)
        spread = getattr(model, "hf_device_map", None)
        if spread and len(set(spread.values())) > 1 and here != {target}:
            names = ", ".join(sorted(str(d) for d in here))
            raise ValueError(f"the model is spread over {names} by a device map; leave device unset (None) "
                             f"instead of {str(device)!r}")
        if here != {target}:
            model.to(target)
    if cast is not None:
        model.to(cast)
    return model
