"""Devices and dtypes (issue 14), on the CPU: names resolve or fail naming the devices that exist,
`--device cuda` without CUDA exits 2 before any model loads, load()/scan()/evaluate() take a device
and a dtype, and every hwnoise mechanism works on a model dispatched by accelerate (device_map).
The CUDA side lives in tests/test_gpu.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, snapshot, tiny_llama  # noqa: E402

import hwnoise as hn  # noqa: E402
from hwnoise import devices, models  # noqa: E402
from hwnoise.cli import app  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")


# --- names -----------------------------------------------------------------------------------------


def test_resolve_device_names():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(" CPU ") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert devices.resolve_device("auto") == expected
    assert devices.resolve_device(None) == expected


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_cuda_names_the_devices_here(name):
    with pytest.raises(ValueError, match=r"CUDA is not available.*devices here: cpu"):
        devices.resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu", "cuda:-1", ""])
def test_unknown_device_names_what_is_accepted(name):
    with pytest.raises(ValueError, match=r"unknown device .*auto, cpu, cuda, cuda:N.*devices here: cpu"):
        devices.resolve_device(name)


def test_resolve_dtype():
    assert devices.resolve_dtype("auto") is None
    assert devices.resolve_dtype(None) is None
    assert devices.resolve_dtype("bf16") is torch.bfloat16
    assert devices.resolve_dtype("bfloat16") is torch.bfloat16
    assert devices.resolve_dtype("FP16") is torch.float16
    assert devices.resolve_dtype("fp32") is torch.float32
    assert devices.resolve_dtype(torch.float16) is torch.float16
    for bad in ("int8", "fp8", torch.int8, 3):
        with pytest.raises(ValueError, match="auto, bf16, fp16, fp32"):
            devices.resolve_dtype(bad)


# --- the CLI ----------------------------------------------------------------------------------------


@no_cuda
@pytest.mark.parametrize("command", ["scan", "eval", "formats"])
def test_cli_device_cuda_without_cuda_exits_2(command, tmp_path, monkeypatch):
    # No model may load before the device is refused: make loading itself fail loudly.
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded a model despite a bad --device"))
    result = CliRunner().invoke(app, [command, "--device", "cuda", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "CUDA is not available" in text and "devices here: cpu" in text


@pytest.mark.parametrize("command", ["scan", "eval", "formats"])
def test_cli_bad_dtype_exits_2(command, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded a model despite a bad --dtype"))
    result = CliRunner().invoke(app, [command, "--dtype", "int4", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "unknown dtype 'int4'" in result.output


@pytest.mark.parametrize("command", ["scan", "eval", "formats"])
def test_cli_passes_device_and_dtype_to_load(command, tmp_path, monkeypatch):
    seen = {}

    def fake_load(spec, **kwargs):
        seen.update(kwargs, spec=spec)
        raise ValueError("stop here")  # the command exits 2 with this message

    monkeypatch.setattr(models, "load", fake_load)
    result = CliRunner().invoke(app, [command, "--device", "cpu", "--dtype", "bf16", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    assert seen == {"spec": "default", "device": "cpu", "dtype": "bf16", "device_map": None}


# --- load -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models

    path = tmp_path_factory.mktemp("tiny")
    net = tiny_llama()
    net.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(300)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t0")),
                                  eos_token="t0")
    tok.save_pretrained(path)
    return path


def test_load_dtype_auto_is_the_checkpoints(tiny_dir):
    model, _ = models.load(tiny_dir, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model, _ = models.load(tiny_dir, device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = models.load(tiny_dir, device="cpu", dtype="fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_load_bad_device_fails_before_reading_weights(tiny_dir, monkeypatch):
    monkeypatch.setattr(models, "_load_hf", lambda *a, **k: pytest.fail("read weights despite a bad device"))
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        models.load(tiny_dir, device="tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        models.load(tiny_dir, dtype="int8")
    with pytest.raises(ValueError, match="device_map"):
        models.load(tiny_dir, device_map="balanced_low_0")


def test_load_device_map_auto_on_cpu(tiny_dir, monkeypatch):
    """The accelerate path: device_map reaches from_pretrained; on a CPU machine every weight stays
    resident on the CPU (transformers keeps a one-device map undispatched) and the model is the same."""
    real, seen = models.AutoModelForCausalLM.from_pretrained, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = models.load(tiny_dir, device_map="auto")
    assert seen == ["auto"]
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ref, _ = models.load(tiny_dir, device="cpu")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_load_refuses_offloaded_weights(tiny_dir, monkeypatch):
    """A device map that leaves weights on the meta device (offloaded) is an error naming them."""
    real = models._load_hf

    def offloading(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        layer = model.model.layers[1].mlp.down_proj
        layer._parameters["weight"] = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"))
        return model, tok

    monkeypatch.setattr(models, "_load_hf", offloading)
    with pytest.raises(ValueError, match=r"offloads model\.layers\.1\.mlp\.down_proj\.weight"):
        models.load(tiny_dir, device_map="auto")


# --- scan / evaluate take a device and a dtype ---------------------------------------------------


def test_scan_dtype_casts_the_model_and_device_cpu_works():
    net, tok = tiny_llama(), ByteTokenizer()
    report = hn.scan(net, tok, texts=["a b c d", "e f g"], format="mxfp4", device="cpu", dtype="bf16",
                     end_to_end=False)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert len(report.rows) > 0
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        hn.scan(net, tok, texts=["a b"], device="tpu")


@no_cuda
def test_evaluate_bad_device_before_generation():
    net, tok = tiny_llama(), ByteTokenizer()
    with pytest.raises(ValueError, match="devices here: cpu"):
        hn.evaluate(net, tok, [{"id": "1", "question": "1+1?", "gold": "2"}], ["clean"], device="cuda")


def test_place_refuses_to_move_a_spread_model():
    net = tiny_llama()
    net.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": 0}  # what accelerate records
    devices.place(net, "cpu")  # already there: nothing to move
    net.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "disk"}
    net.to("meta")
    with pytest.raises(ValueError, match="spread over meta by a device map"):
        devices.place(net, "cpu")


# --- a model dispatched by accelerate: every mechanism -----------------------------------------------


def _dispatched(net):
    """The tiny Llama as accelerate dispatches a device-mapped model: AlignDevicesHooks on every
    block (force_hooks: on a CPU machine the map has one device, which would skip them)."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(len(net.model.layers))})
    model = dispatch_model(net, device_map=device_map, force_hooks=True)
    assert hasattr(model.model.layers[0], "_hf_hook")  # the hooks are really there
    return model


TEXTS = ["one two three four", "five six seven", "eight nine ten eleven twelve"]


def test_scan_on_a_dispatched_model_equals_the_plain_scan():
    tok = ByteTokenizer()
    plain = hn.scan(tiny_llama(), tok, texts=TEXTS, format="mxfp4")
    net = _dispatched(tiny_llama())
    before = snapshot(net)
    spread = hn.scan(net, tok, texts=TEXTS, format="mxfp4")
    assert [r.name for r in spread.rows] == [r.name for r in plain.rows]
    for a, b in zip(spread.rows, plain.rows):
        assert a.sqnr_db == b.sqnr_db and a.loss_increase == pytest.approx(b.loss_increase, abs=1e-6)
    after = snapshot(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    inputs = hn.scan(net, tok, texts=TEXTS, format="mxfp4", where="input", end_to_end=False)
    assert all(r.sqnr_db < 60 for r in inputs.rows)


def test_hooks_weight_swaps_and_aqn_on_a_dispatched_model():
    net = _dispatched(tiny_llama())
    clean = snapshot(net)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        ref = net(ids).logits
        with hn.inject(net, hn.errors.RelativeGaussian(0.1), where="output", targets="linear"):
            noisy = net(ids).logits
        with hn.inject(net, hn.errors.Quantize("mxfp4"), where="weight", targets="linear"):
            w4 = net(ids).logits
        with hn.noisy_ops(hn.errors.RelativeGaussian(0.1)):
            ops = net(ids).logits
        back = net(ids).logits
    assert not torch.equal(noisy, ref) and not torch.equal(w4, ref) and not torch.equal(ops, ref)
    assert torch.equal(back, ref)
    assert all(torch.equal(clean[k], v) for k, v in snapshot(net).items())

    from hwnoise.aqn import Constant

    aqn = hn.AQN(Constant(0.05), seed=0)
    aqn.apply(net, step=1, total_steps=10)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(net.state_dict()[norm], clean[norm])
    aqn.restore(net)
    assert all(torch.equal(clean[k], v) for k, v in snapshot(net).items())


# --- device hygiene of the hot paths (CPU-checkable parts of the GPU requirements) ----------------


class _RecordDevices(TorchDispatchMode):
    """Every device an aten op sees a tensor on, and every host read of a tensor's value."""

    def __init__(self):
        super().__init__()
        self.devices: dict[str, set] = {}
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                self.devices.setdefault(a.device.type, set()).add(str(func))
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default, torch.ops.aten.nonzero.default):
            self.reads.append(str(func))
        return func(*args, **kwargs)


FORMATS = ["mxfp4", "mxfp4:rceil", "mxfp6_e2m3", "mxfp8_e4m3", "nvfp4", "nvfp4:torchao", "hif4", "fp8_e4m3",
           "bf16"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", [None, "stochastic"])
def test_format_kernels_stay_on_the_inputs_device(fmt, rounding):
    """On a 'meta' input every op of the round trip must see meta tensors only: a CPU tensor made
    inside the kernels (a table, a constant) would cost a host-to-device copy per call on CUDA, and
    a host read (.item(), a data-dependent branch) a synchronisation. Both show up here on the CPU."""
    from hwnoise.formats import fake_quant

    if fmt not in hn.formats.names() and fmt.split(":")[0] not in hn.formats.names():
        pytest.skip(f"{fmt} not registered")
    x = torch.empty(4, 128, device="meta")
    o = fake_quant._options(x, fmt, None, rounding, None, None, None)
    uniform = torch.empty(4, 128, device="meta") if o.rounding == "stochastic" else None
    with _RecordDevices() as rec:
        y = fake_quant.fake_quantize(x, o, uniform)
    assert y.device.type == "meta" and y.shape == x.shape
    assert set(rec.devices) == {"meta"}, f"{fmt}: CPU tensors in {sorted(rec.devices.get('cpu', ()))}"
    assert rec.reads == [], f"{fmt}: host reads {rec.reads}"


def test_noisy_linear_forward_backward_reads_no_tensor_value_on_the_host():
    """Operator noise fwd+bwd: no .item()/int()/bool() of a tensor that lives on the compute device.
    (The step counter is a host integer; on CUDA the draws then launch without a synchronisation.)"""
    torch.manual_seed(0)
    x = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(32, 64, requires_grad=True)
    host_tensors = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                t = args[0]
                # A value read of a float tensor or of anything bigger than a scalar would be a
                # sync on CUDA; the 0-d int64 step tensors the custom ops pass are host-side.
                host_tensors.append((t.dtype, tuple(t.shape)))
            return func(*args, **(kwargs or {}))

    with hn.noisy_ops(hn.errors.RelativeGaussian(0.05), backward=True):
        with Watch():
            y = torch.nn.functional.linear(x, w)
            y.sum().backward()
    assert x.grad is not None and w.grad is not None
    assert all(dtype == torch.int64 and shape == () for dtype, shape in host_tensors), host_tensors

