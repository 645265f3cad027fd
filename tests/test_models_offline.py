"""Hub ids with no hub: a clear error at once (not tens of seconds of retries), or the cached copy."""

from __future__ import annotations

import socket
import time

import pytest
from huggingface_hub import constants

from hwnoise import models


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No route to the hub, an empty HF cache, no proxy; records any attempt to download."""
    def refuse(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    downloads = []

    def fake_load_hf(source, dtype, *, local_files_only, device_map=None):
        downloads.append((source, local_files_only))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(models, "_load_hf", fake_load_hf)
    return downloads


def test_offline_hub_id_fails_fast_and_names_a_local_path(no_hub):
    start = time.perf_counter()
    with pytest.raises(OSError, match=r"hub is unreachable.*Pass a local path.*\.gguf") as info:
        models.load("someorg/some-model", device="cpu")
    assert time.perf_counter() - start < 5
    assert "someorg/some-model" in str(info.value)
    assert no_hub == []  # never went to the hub (where transformers retries for tens of seconds)


def test_hub_offline_env_fails_fast_without_probing(no_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed the network although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_probe)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        models.resolve("someorg/some-model")


def test_offline_hub_id_in_the_local_cache_resolves_to_it(no_hub, tmp_path):
    snapshot = tmp_path / "hub" / "models--someorg--some-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someorg--some-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--some-model" / "refs" / "main").write_text("a" * 40)
    assert models.resolve("someorg/some-model") == snapshot


def test_behind_a_proxy_the_direct_probe_is_skipped(no_hub, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert models.resolve("someorg/some-model") == "someorg/some-model"


def test_a_hanging_probe_is_cut_at_its_timeout(no_hub, monkeypatch):
    import threading

    release = threading.Event()

    def hang(*args, **kwargs):  # a DNS lookup that never answers (the socket timeout does not bound it)
        release.wait(30)
        raise OSError("late")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(models, "_HUB_PROBE_TIMEOUT_S", 0.2)
    start = time.perf_counter()
    with pytest.raises(OSError, match="within 0.2 s"):
        models.resolve("someorg/some-model")
    assert time.perf_counter() - start < 5
    release.set()
