"""hwnoise on CUDA (issue 14). Every test is marked ``gpu`` and skipped without CUDA (tests/conftest.py).

What is held, against the CPU eager reference:
- every registered format (and block tiles / another axis) bit for bit on adversarial inputs (ties,
  subnormals, NaN/Inf blocks, all-zero blocks, +-0, values just below powers of two), in bf16,
  fp16 and fp32, on both the eager (small) and the compiled (large) path;
- stochastic rounding. Stated behaviour: for a seed, CUDA draws its uniforms from CUDA's Philox
  generator and the CPU from mt19937, so the draws are NOT equal across devices, only equally
  distributed (U[0, 1)); on one device a seed replays exactly; and given the same draws, CUDA's
  result equals the CPU reference bit for bit. The tests check exactly these three things;
- noise: keyed draws replay on CUDA, differ by seed, leave the model clean after the block, no host
  synchronisation in noisy GEMMs fwd+bwd or in the format kernels; weight swaps and AQN restore
  bit-exactly; a model spread over two devices (CPU + cuda:0) scans, injects and restores;
- the bundled model's scan, eval (a few problems) and a 2-step train on CUDA.

The bundled model is ``$HWNOISE_GPU_MODEL`` when set (benchmarks/gpu_check.sh sets it to the
bundled architecture and tokenizer with seeded random weights when the GGUF, too big to travel to
the GPU machine, is missing), else ``default``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, snapshot, tiny_llama  # noqa: E402

import hwnoise as hn  # noqa: E402
from hwnoise.formats import fake_quant  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FORMAT_CASES = [(name, {}) for name in hn.formats.names()] + [
    ("mxfp4", {"block": (32, 32)}), ("mxfp4", {"axis": 0}), ("mxfp4", {"scale_mode": "rceil"}),
    ("mxfp4", {"scale_mode": "ceil"}), ("mxfp4", {"scale_mode": "even"}), ("mxfp8_e4m3", {"flavor": "torchao"}),
    ("nvfp4", {"flavor": "torchao"}), ("mxfp4", {"rounding": "half_away"}), ("nvfp4", {"rounding": "toward_zero"}),
]
BUNDLED = os.environ.get("HWNOISE_GPU_MODEL", "default")


def _case_id(case):
    name, opts = case
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


# --- adversarial inputs ------------------------------------------------------------------------


def adversarial(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of 256 (multiples of every block size: 16, 32, 64) cycling through hard cases."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    tiny = {torch.float32: 2.0**-140, torch.bfloat16: 2.0**-130, torch.float16: 2.0**-20}[dtype]
    big = {torch.float32: 2.0**120, torch.bfloat16: 2.0**120, torch.float16: 2.0**14}[dtype]
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -2.5, -5.0, 7.0, -7.0, 0.0, -0.0],
                        dtype=torch.float64)
    below_pow2 = torch.nextafter(2.0 ** torch.arange(-8, 8, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    for r in range(rows):
        kind = r % 12
        if kind == 1:
            x[r] = ties.repeat(cols // 16)  # E2M1 ties under a unit scale (amax 7 -> scale 1)
        elif kind == 2:
            x[r] *= tiny  # subnormals of the input dtype
        elif kind == 3:
            x[r] *= big  # near the top of the dtype (fp16: block scales above the element max)
        elif kind == 4:
            x[r, 5] = float("nan")  # one NaN per row: its blocks dequantize to NaN
        elif kind == 5:
            x[r, 40] = float("inf")
            x[r, 100] = float("-inf")
        elif kind == 6:
            x[r] = 0.0  # all-zero blocks
        elif kind == 7:
            x[r] = -0.0
            x[r, ::3] = 0.0  # +-0 mixed
        elif kind == 8:
            x[r] = below_pow2.repeat(cols // 16)  # just below powers of two (log2 misrounds)
        elif kind == 9:
            x[r, ::2] *= 2.0**-24  # wide dynamic range inside a block: deadzone
        elif kind == 10:
            x[r] *= 448.0 / x[r].abs().max()  # the E4M3 maximum exactly
    return x.to(dtype)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ ({int((nan_a ^ nan_e).sum())} elements)"
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[actual.dtype]
    a, e = actual.masked_fill(nan_a, 0).view(ints), expected.masked_fill(nan_e, 0).view(ints)
    bad = a != e
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ in their bits; first at flat index {i}: "
                             f"cuda {actual.flatten()[i].item()!r} vs cpu {expected.flatten()[i].item()!r}")


@pytest.fixture
def eager_reference(monkeypatch):
    """quantize on the CPU with the compiled path off: the reference."""

    def reference(x, fmt, **opts):
        monkeypatch.setenv("HWNOISE_COMPILE", "0")
        try:
            return hn.quantize(x, fmt, **opts)
        finally:
            monkeypatch.setenv("HWNOISE_COMPILE", "1")

    return reference


# --- formats: bit-exact against the CPU eager reference ---------------------------------------------


def _check_format(case, dtype, size, reference):
    name, opts = case
    x = adversarial(*size, dtype)
    expected = reference(x, name, **opts)
    actual = hn.quantize(x.to(CUDA), name, **opts)
    assert actual.device.type == "cuda"
    assert_bits_equal(actual.cpu(), expected, f"{_case_id(case)} {dtype} {size}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", FORMAT_CASES, ids=_case_id)
def test_format_on_cuda_equals_cpu_eager_reference(case, dtype, eager_reference):
    """Below COMPILE_MIN_NUMEL: the eager kernels on CUDA tensors."""
    _check_format(case, dtype, (48, 256), eager_reference)


# Each (format, options, dtype) compiles its own kernels (seconds each): the compiled path is held
# on the formats and options whose kernels differ, not on every alias.
COMPILED_CASES = [("mxfp4", {}), ("mxfp4", {"scale_mode": "rceil"}), ("mxfp4", {"block": (32, 32)}),
                  ("mxfp6_e2m3", {}), ("mxfp8_e4m3", {}), ("mxint8", {}), ("nvfp4", {}), ("nvfp4", {"flavor": "torchao"}),
                  ("hif4", {}), ("fp8_e4m3", {}), ("bf16", {})]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", COMPILED_CASES, ids=_case_id)
def test_format_on_cuda_compiled_equals_cpu_eager_reference(case, dtype, eager_reference):
    """At or above COMPILE_MIN_NUMEL: the torch.compile'd kernels on CUDA (never silently eager)."""
    _check_format(case, dtype, (384, 1024), eager_reference)
    assert not fake_quant._compile_broken, "torch.compile failed on CUDA: the eager fallback was tested instead"


def test_the_large_case_really_takes_the_compiled_path():
    assert 384 * 1024 >= fake_quant.COMPILE_MIN_NUMEL > 48 * 256
    assert fake_quant._compile_enabled(), "HWNOISE_COMPILE is off: the compiled CUDA path is not under test"


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "hif4", "fp8_e4m3", "mxfp8_e4m3"])
def test_format_gradient_is_straight_through_on_cuda(name):
    x = adversarial(48, 256, torch.float32).to(CUDA).nan_to_num(0.0, 0.0, 0.0).requires_grad_()
    hn.quantize(x, name).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# --- stochastic rounding ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "hif4", "fp8_e4m3", "bf16", "mxfp6_e2m3"])
@pytest.mark.parametrize("size", [(48, 256), (384, 1024)], ids=["eager", "compiled"])
def test_stochastic_rounding_replays_on_cuda_and_equals_cpu_given_the_same_draws(name, size):
    x = adversarial(*size, torch.float32)
    xc = x.to(CUDA)
    first = hn.quantize(xc, name, rounding="stochastic", seed=7)
    again = hn.quantize(xc, name, rounding="stochastic", seed=7)
    assert_bits_equal(again, first, f"{name}: same seed on CUDA")
    other = hn.quantize(xc, name, rounding="stochastic", seed=8)
    assert not torch.equal(other.nan_to_num(), first.nan_to_num()), "the seed must matter"
    # The draws quantize used on CUDA, given to the CPU eager reference: the same result, bit for bit.
    draws = fake_quant._uniform_like(xc, 7).cpu()
    o = fake_quant._options(x, name, None, "stochastic", None, None, None)
    reference = fake_quant.fake_quantize(x, o, draws)
    assert_bits_equal(first.cpu(), reference, f"{name}: CUDA vs CPU reference with CUDA's draws")


def test_cuda_draws_differ_from_cpu_draws_but_follow_the_same_distribution():
    from scipy.stats import ks_2samp

    shape = (256, 1024)
    cpu = fake_quant._uniform_like(torch.empty(shape), 3)
    cuda = fake_quant._uniform_like(torch.empty(shape, device=CUDA), 3).cpu()
    assert not torch.equal(cpu, cuda)  # Philox vs mt19937: a seed does not give the same draws
    assert ks_2samp(cpu.flatten()[:100_000].numpy(), cuda.flatten()[:100_000].numpy()).pvalue > 1e-4
    assert 0 <= float(cuda.min()) and float(cuda.max()) < 1


def test_stochastic_rounding_on_cuda_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 256, generator=g) * 5 + 0.5).to(CUDA)  # inside the E2M1 range of unit-scale blocks
    x[:, 0] = 6.0  # pins each block's scale to 1
    mean = torch.stack([hn.quantize(x, "mxfp4", rounding="stochastic", seed=s) for s in range(400)]).mean(0)
    nearest = hn.quantize(x, "mxfp4")
    assert (mean - x).abs().mean() < 0.1 * (nearest - x).abs().mean()


# --- noise on CUDA ----------------------------------------------------------------------------------


@pytest.fixture
def cuda_llama():
    return tiny_llama().to(CUDA)


def _batch(device=CUDA):
    return torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17], [1, 2, 3, 4, 5, 6, 7, 8]], device=device)


def _noisy_run(model, seed):
    model.zero_grad(set_to_none=True)
    with hn.noisy_ops(hn.errors.RelativeGaussian(0.05), seed=seed, backward=True):
        out = model(_batch(), labels=_batch())
        out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                 if p.grad is not None}


def test_operator_noise_replays_on_cuda_and_leaves_the_model_clean(cuda_llama):
    with torch.no_grad():
        clean = cuda_llama(_batch()).logits
    a_logits, a_grads = _noisy_run(cuda_llama, 0)
    b_logits, b_grads = _noisy_run(cuda_llama, 0)
    c_logits, _ = _noisy_run(cuda_llama, 1)
    assert torch.equal(a_logits, b_logits) and all(torch.equal(a_grads[k], b_grads[k]) for k in a_grads)
    assert not torch.equal(a_logits, c_logits) and not torch.equal(a_logits, clean)
    with torch.no_grad():
        assert torch.equal(cuda_llama(_batch()).logits, clean)


def test_noisy_gemms_forward_backward_do_not_synchronise(cuda_llama):
    _noisy_run(cuda_llama, 0)  # warm up (allocations, first kernel loads)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = torch.randn(64, 64, device=CUDA, requires_grad=True)
        w = torch.randn(128, 64, device=CUDA, requires_grad=True)
        with hn.noisy_ops(hn.errors.RelativeGaussian(0.05), backward=True):
            for _ in range(3):
                torch.nn.functional.linear(x, w).square().sum().backward()
                (x @ w.T).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "hif4", "fp8_e4m3"])
def test_format_kernels_do_not_synchronise(name):
    x = torch.randn(1024, 1024, device=CUDA, dtype=torch.bfloat16)
    hn.quantize(x, name)  # compile outside the check
    hn.quantize(x, name, rounding="stochastic", seed=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hn.quantize(x, name)
        hn.quantize(x, name, rounding="stochastic", seed=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_module_noise_weight_swaps_and_aqn_restore_bit_exactly_on_cuda(cuda_llama):
    from hwnoise.aqn import Constant

    net = cuda_llama.to(torch.bfloat16)
    clean = snapshot(net)
    with torch.no_grad():
        ref = net(_batch()).logits
        with hn.inject(net, hn.errors.RelativeGaussian(0.1), where="output", targets="linear", seed=0):
            a = net(_batch()).logits
        with hn.inject(net, hn.errors.RelativeGaussian(0.1), where="output", targets="linear", seed=0):
            b = net(_batch()).logits
        with hn.inject(net, hn.errors.Quantize("mxfp4"), where="weight", targets="linear"):
            w4 = net(_batch()).logits
    assert torch.equal(a, b) and not torch.equal(a, ref) and not torch.equal(w4, ref)
    assert all(torch.equal(clean[k], v) for k, v in snapshot(net).items())
    aqn = hn.AQN(Constant(1e-3), seed=0)
    aqn.apply(net, step=1, total_steps=4)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(net.state_dict()[norm], clean[norm])  # bf16 weights: the fp32 master's noise lands
    aqn.restore(net)
    assert all(torch.equal(clean[k], v) for k, v in snapshot(net).items())


# --- a model spread over two devices -------------------------------------------------------------


def _spread(net):
    """Half the decoder layers and lm_head on cuda:0, the rest on the CPU, every weight resident
    (main_device cpu: accelerate offloads nothing). Two real devices on a one-GPU machine."""
    from accelerate import dispatch_model

    n = len(net.model.layers)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": 0, "lm_head": 0}
    device_map.update({f"model.layers.{i}": ("cpu" if i < n // 2 else 0) for i in range(n)})
    net.config.tie_word_embeddings = False
    net.lm_head.weight = torch.nn.Parameter(net.lm_head.weight.detach().clone())
    model = dispatch_model(net, device_map=device_map, main_device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu", "cuda"}
    return model


def test_scan_inject_and_aqn_on_a_model_spread_over_cpu_and_cuda():
    from hwnoise.aqn import Constant

    tok = ByteTokenizer()
    texts = ["one two three four", "five six seven", "eight nine ten eleven twelve"]
    plain_net = tiny_llama()
    plain_net.config.tie_word_embeddings = False
    plain_net.lm_head.weight = torch.nn.Parameter(plain_net.lm_head.weight.detach().clone())
    plain = hn.scan(plain_net, tok, texts=texts, format="mxfp4")
    net = _spread(tiny_llama())
    clean = snapshot(net)
    spread = hn.scan(net, tok, texts=texts, format="mxfp4")
    for a, b in zip(spread.rows, plain.rows, strict=True):
        assert a.name == b.name and a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-5)
        assert a.loss_increase == pytest.approx(b.loss_increase, abs=1e-3)
    inputs = hn.scan(net, tok, texts=texts, format="mxfp4", where="input")
    assert len(inputs.rows) == len(spread.rows)
    ids = _batch("cpu")
    with torch.no_grad():
        ref = net(ids).logits
        with hn.inject(net, hn.errors.Quantize("mxfp4"), where="weight", targets="linear"):
            w4 = net(ids).logits
        with hn.noisy_ops(hn.errors.RelativeGaussian(0.05)):
            ops = net(ids).logits
    assert not torch.equal(w4, ref) and not torch.equal(ops, ref)
    aqn = hn.AQN(Constant(1e-2), seed=0)
    aqn.apply(net, step=1, total_steps=4)
    aqn.restore(net)
    assert all(torch.equal(clean[k], v) for k, v in snapshot(net).items())


def test_load_device_map_auto_on_cuda(tmp_path):
    from hwnoise.models import load

    tiny_llama().save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    model, _ = load(tmp_path, device_map="auto", dtype="bf16")
    assert getattr(model, "hf_device_map", None)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="no CUDA device 7.*cuda:0"):
        load(tmp_path, device="cuda:7")


def _save_tokenizer(path):
    from tokenizers import Tokenizer, models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(300)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t0")),
                            eos_token="t0").save_pretrained(path)


# --- the bundled model on CUDA: scan, eval, train ---------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    from hwnoise.models import load

    try:
        return load(BUNDLED, device="cuda")
    except FileNotFoundError as exc:
        pytest.skip(f"bundled model not here ({exc}); set HWNOISE_GPU_MODEL")


def test_bundled_scan_on_cuda_matches_the_cpu_scan(bundled):
    from hwnoise.models import load

    model, tok = bundled
    cuda = hn.scan(model, tok, samples=4, max_length=16, layers=[0, 29], format="mxfp4")
    cpu_model, _ = load(BUNDLED, device="cpu")
    cpu = hn.scan(cpu_model, tok, samples=4, max_length=16, layers=[0, 29], format="mxfp4")
    assert len(cuda.rows) == len(cpu.rows) >= 14
    for a, b in zip(cuda.rows, cpu.rows, strict=True):
        assert a.name == b.name
        assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-5)  # same bits, reductions in another order
        assert a.deadzone_ratio == b.deadzone_ratio and a.saturation_ratio == b.saturation_ratio
        assert a.loss_increase == pytest.approx(b.loss_increase, abs=2e-3)


def _cli(args):
    from typer.testing import CliRunner

    import hwnoise.cli.train  # noqa: F401
    from hwnoise.cli import app

    return CliRunner().invoke(app, args)


def test_bundled_scan_cli_on_cuda(tmp_path):
    result = _cli(["scan", BUNDLED, "--device", "cuda", "-n", "4", "--max-length", "16", "-o", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert len(report["rows"]) >= 200  # every linear layer of the 30-layer model
    print("scan on CUDA:", report.get("seconds"))


def test_cli_bad_cuda_index_exits_2_naming_the_gpus():
    result = _cli(["scan", "--device", f"cuda:{torch.cuda.device_count()}"])
    assert result.exit_code == 2 and "cuda:0" in result.output, result.output


def test_bundled_eval_on_cuda_is_deterministic(bundled, tmp_path):
    model, tok = bundled
    from hwnoise.data import load_problems

    problems = load_problems("arith", n=4, seed=0)
    settings = ["clean", "relative:0.05@ops", "weights:mxfp4"]
    first = hn.evaluate(model, tok, problems, settings, batch_size=4, max_new_tokens=32, out=tmp_path / "a")
    again = hn.evaluate(model, tok, problems, settings, batch_size=4, max_new_tokens=32, out=tmp_path / "b")
    a = (tmp_path / "a" / "records.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "records.jsonl").read_text().splitlines()
    assert len(a) == 12 and [json.loads(r)["completion"] for r in a] == [json.loads(r)["completion"] for r in b]
    assert len(first.settings) == len(again.settings) == 3
    result = _cli(["eval", BUNDLED, "--device", "cuda", "-n", "4", "--noise", "0,0.05", "--max-new-tokens", "32",
                   "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output


def test_bundled_two_step_train_on_cuda(tmp_path):
    pytest.importorskip("trl")
    example = Path(__file__).resolve().parents[1] / "examples" / "mxfp4_w4a16_aqn.yaml"
    overrides = [f"model={BUNDLED}", "device=cuda", "steps=2", "data.n_train=8", "data.n_eval=4",
                 "algorithm.max_completion_length=24", "eval.max_new_tokens=16", "eval.every=2",
                 "eval.at_start=false", "logging.save_steps=0"]
    result = _cli(["train", str(example), *overrides, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "finished" and run["steps"] == 2
