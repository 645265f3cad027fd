"""One run identity: every input that changes a run's result, so that a rerun reuses records or
resumes a run only when it would compute the same thing.

``hwnoise eval`` keys its records and ``hwnoise train --resume`` continues a run; both are wrong
when something that changes the numbers changed in between. A path is not an input: an edited
``plan.json`` at the same path is another plan, so a plan enters the identity by its *content*
(``plan_digest``). The dtype and the device the model really runs in enter it too (an fp16 run's
records are not an fp32 run's), and so does the engine that generates ("hf": transformers'
``generate``).

``run_identity`` builds the mapping; ``identity_differences`` says, key by key, what differs between
a stored identity and the current one; ``check_same_identity`` raises ``IdentityMismatch`` (a
ValueError) naming every difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_ENGINE", "IDENTITY_KEYS", "IdentityMismatch", "check_same_identity", "dtype_name", "identity_differences",
    "model_placement", "plan_digest", "plan_digests", "run_identity",
]

DEFAULT_ENGINE = "hf"
# The keys of an identity, in the order differences are reported.
IDENTITY_KEYS = ("model", "settings", "plans", "dtype", "device", "engine")


class IdentityMismatch(ValueError):
    """A stored run was made with other inputs than the current ones (the message names each)."""


def plan_digest(plan) -> str:
    """The sha256 of a weight plan's content: its module -> format pairs, order-free.

    Args:
        plan: a ``plan.json`` path, a mapping or a ``hwnoise.plans.WeightPlan``.

    Whitespace and key order in the file do not change the digest; any changed format or module does.

    Example:
        >>> plan_digest({"model.layers.0.mlp.down_proj": "mxfp8"}) == plan_digest({"model.layers.0.mlp.down_proj": "mxfp8"})
        True
    """
    from .plans import WeightPlan

    pairs = sorted(WeightPlan.coerce(plan).as_dict().items())
    return hashlib.sha256(json.dumps(pairs).encode("utf-8")).hexdigest()


def _plan_values(emulation) -> list:
    """The plans an Emulation uses (weights and, where the language allows it, inputs)."""
    from .plans import is_plan_spec

    out = []
    for name in ("weight_format", "input_format", "weight_plan", "input_plan"):
        value = getattr(emulation, name, None)
        if value is not None and is_plan_spec(value):
            out.append(value)
    return out


def plan_digests(settings: Iterable) -> dict[str, str]:
    """``{plan as the spec names it: content sha256}`` for every plan the settings use.

    Args:
        settings: emulation specs or ``Emulation``s.

    Example:
        >>> plan_digests(["clean", "weights:mxfp4"])
        {}
    """
    from .emulation import Emulation

    out: dict[str, str] = {}
    for setting in settings:
        if setting is None:
            continue
        for plan in _plan_values(Emulation.parse(setting)):
            key = str(getattr(plan, "source", None) or plan) if not isinstance(plan, (str, os.PathLike)) else str(plan)
            out[key] = plan_digest(plan)
    return out


def dtype_name(dtype) -> str:
    """``torch.float16`` -> ``"fp16"`` (the names ``--dtype`` accepts); other dtypes as torch writes them."""
    from .devices import DTYPES

    for name, value in DTYPES.items():
        if value is not None and value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def model_placement(model) -> tuple[str, str]:
    """``(dtype, device)`` the model's floating-point parameters really have: ``("fp32", "cpu")``.

    Several of either (a model spread by a device map, mixed precision) are joined with '+', in
    sorted order. Device indices are left out: ``cuda:0`` and ``cuda:1`` compute the same.

    Example:
        >>> import torch
        >>> model_placement(torch.nn.Linear(2, 2))
        ('fp32', 'cpu')
    """
    dtypes, devices = set(), set()
    for p in model.parameters():
        if p.is_floating_point():
            dtypes.add(dtype_name(p.dtype))
            devices.add(p.device.type)
    return "+".join(sorted(dtypes)) or "none", "+".join(sorted(devices)) or "none"


def run_identity(model: str, settings: Iterable, *, dtype: str, device: str, engine: str = DEFAULT_ENGINE) -> dict:
    """The identity of a run: the mapping a rerun must match to reuse its results.

    Args:
        model: the model as the user named it (``"default"``, a path, a hub id).
        settings: the emulation specs (or ``Emulation``s) the run applies, in its order.
        dtype, device: what the model runs in (``model_placement`` reads them off a loaded model).
        engine: what generates: "hf" (transformers) unless another engine is used.

    Example:
        >>> run_identity("default", ["clean", "weights:mxfp4"], dtype="fp32", device="cpu")["settings"]
        ['clean', 'weights:mxfp4']
    """
    from .emulation import Emulation

    settings = [s for s in settings if s is not None]
    return {
        "model": str(model),
        "settings": [Emulation.parse(s).spec for s in settings],
        "plans": plan_digests(settings),
        "dtype": str(dtype),
        "device": str(device),
        "engine": str(engine),
    }


def identity_differences(stored: Mapping, current: Mapping, keys: Iterable[str] = IDENTITY_KEYS) -> list[str]:
    """One line per identity key that differs: ``"dtype: 'fp16' there, 'fp32' now"``.

    A key the stored identity lacks (written before it was recorded) counts as different: a run
    that cannot be shown to be the same is not reused.

    Example:
        >>> identity_differences({"dtype": "fp16"}, {"dtype": "fp32"}, keys=["dtype"])
        ["dtype: 'fp16' there, 'fp32' now"]
    """
    out = []
    for key in keys:
        before, now = stored.get(key, "<not recorded>"), current.get(key)
        if before == now:
            continue
        if key == "plans" and isinstance(before, Mapping) and isinstance(now, Mapping):
            for path in sorted(set(before) | set(now)):
                a, b = before.get(path), now.get(path)
                if a != b:
                    describe = lambda d: "absent" if d is None else f"content sha256 {d[:12]}"  # noqa: E731
                    out.append(f"plan {path!r}: {describe(a)} there, {describe(b)} now (the plan file was edited)"
                               if a and b else f"plan {path!r}: {describe(a)} there, {describe(b)} now")
            continue
        out.append(f"{key}: {before!r} there, {now!r} now")
    return out


def check_same_identity(stored: Mapping, current: Mapping, where: str, remedy: str,
                        keys: Iterable[str] = IDENTITY_KEYS) -> None:
    """Raise ``IdentityMismatch`` naming each difference unless ``stored`` matches ``current``.

    Args:
        stored: the identity recorded with the earlier run.
        current: this run's identity.
        where: what holds the earlier run, for the message (a directory or file).
        remedy: what the user can do instead, e.g. "use a new --out or --overwrite".

    Example:
        >>> check_same_identity({"dtype": "fp32"}, {"dtype": "fp32"}, "out", "use a new --out", keys=["dtype"])
    """
    differ = identity_differences(stored, current, keys)
    if differ:
        raise IdentityMismatch(f"{where} holds a run made with other inputs ({'; '.join(differ)}); its results "
                               f"cannot be reused or continued: {remedy}")
