"""hwnoise on CUDA: every figure a ratio to a baseline measured in the same run (issue 14).

1. Format round trips, `hn.quantize(x, fmt)` on an 8192x8192 bf16 and fp32 CUDA tensor, against
   - a device-to-device copy of the same tensor (`dst.copy_(x)`: the memory floor), and
   - torchao 0.18's CUDA path for the same format (`MXTensor.to_mx(...).dequantize()`,
     `NVFP4Tensor.to_nvfp4(...).dequantize()`), when torchao is installed.
   Targets: within 3x of the copy; >= 10x faster than torchao for mxfp4 and nvfp4.
2. Operator noise fwd+bwd on the bundled model (batch x tokens) under `hn.noisy_ops(RelativeGaussian)`
   (linear, matmul, bmm; forward and backward noise) against the clean step. Target: <= 1.15x.
3. `hwnoise scan` of the bundled model on CUDA (mxfp4, weight mode, end-to-end effects): wall time.

Timing: CUDA events around each call after warm-up (compilation excluded), the median of --repeats.
Run: python benchmarks/gpu.py [--model default] [--json out.json] [--repeats 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import hwnoise as hn  # noqa: E402

FORMATS = ("mxfp4", "nvfp4", "mxfp8_e4m3", "hif4")  # each compiles per dtype: kept to what fits one run
TORCHAO_TARGETS = ("mxfp4", "nvfp4")


def cuda_time(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn() measured with CUDA events (the device's time, not the launch's)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def torchao_round_trip(fmt: str):
    try:
        from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError:
        return None
    mx = {"mxfp4": torch.float4_e2m1fn_x2, "mxfp6_e2m3": DTYPE_FP6_E2M3, "mxfp8_e4m3": torch.float8_e4m3fn}
    if fmt in mx:
        return lambda x: MXTensor.to_mx(x, mx[fmt], 32).dequantize(x.dtype)
    if fmt == "nvfp4":
        return lambda x: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())) \
            .dequantize(x.dtype)
    return None


def formats_section(size: int, repeats: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(size, size, device="cuda", dtype=torch.float32, generator=g).to(dtype)
        dst = torch.empty_like(x)
        copy_s = cuda_time(lambda: dst.copy_(x), repeats)
        for fmt in FORMATS:
            t0 = time.perf_counter()
            hn.quantize(x, fmt)  # compile (excluded from the timing)
            compile_s = time.perf_counter() - t0
            new_s = cuda_time(lambda: hn.quantize(x, fmt), repeats)
            out_s = cuda_time(lambda: hn.quantize(x, fmt, out=dst), repeats)
            ao = torchao_round_trip(fmt)
            ao_s = None
            if ao is not None:
                try:
                    ao_s = cuda_time(lambda: ao(x), max(3, repeats // 4))
                except Exception as exc:  # noqa: BLE001 - report, do not hide
                    print(f"torchao {fmt} {dtype}: {type(exc).__name__}: {exc}", flush=True)
            row = {"format": fmt, "dtype": str(dtype).removeprefix("torch."), "shape": [size, size],
                   "copy_ms": 1e3 * copy_s, "quantize_ms": 1e3 * new_s, "quantize_out_ms": 1e3 * out_s,
                   "torchao_ms": 1e3 * ao_s if ao_s else None, "quantize_vs_copy": new_s / copy_s,
                   "quantize_out_vs_copy": out_s / copy_s, "torchao_vs_hwnoise": ao_s / new_s if ao_s else None,
                   "compile_s": compile_s}
            row["meets_copy_target"] = row["quantize_vs_copy"] <= 3.0
            if fmt in TORCHAO_TARGETS:
                row["meets_torchao_target"] = None if ao_s is None else row["torchao_vs_hwnoise"] >= 10.0
            rows.append(row)
            print(f"{fmt:<11} {row['dtype']:<8} copy {row['copy_ms']:.3f} ms  quantize {row['quantize_ms']:.3f} ms "
                  f"({row['quantize_vs_copy']:.2f}x copy; out= {row['quantize_out_vs_copy']:.2f}x)  torchao "
                  + (f"{row['torchao_ms']:.2f} ms ({row['torchao_vs_hwnoise']:.1f}x slower)" if ao_s else "-"),
                  flush=True)
        del x, dst
        torch.cuda.empty_cache()
    return rows


def noise_section(model_spec: str, batch: int, tokens: int, repeats: int) -> dict:
    from hwnoise.models import load

    model, _ = load(model_spec, device="cuda", dtype="bf16")
    model.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device="cuda", generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def noisy():
        with hn.noisy_ops(hn.errors.RelativeGaussian(0.05), seed=0, backward=True):
            step()

    results = {}
    for _ in range(2):  # interleaved rounds; each setting keeps its fastest
        for name, fn in (("clean", step), ("ops_noise", noisy)):
            s = cuda_time(fn, repeats)
            results[name] = min(results.get(name, s), s)
    out = {"model": model_spec, "dtype": "bf16", "batch": batch, "tokens": tokens,
           "clean_ms": 1e3 * results["clean"], "ops_noise_ms": 1e3 * results["ops_noise"],
           "ops_noise_vs_clean": results["ops_noise"] / results["clean"]}
    out["meets_target"] = out["ops_noise_vs_clean"] <= 1.15
    print(f"fwd+bwd {batch}x{tokens}: clean {out['clean_ms']:.1f} ms, operator noise {out['ops_noise_ms']:.1f} ms "
          f"({out['ops_noise_vs_clean']:.3f}x)", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def scan_section(model_spec: str, samples: int) -> dict:
    from hwnoise.models import load

    t0 = time.perf_counter()
    model, tok = load(model_spec, device="cuda")
    load_s = time.perf_counter() - t0
    hn.scan(model, tok, samples=2, max_length=8, layers=[0], format="mxfp4")  # compile the kernels first
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = hn.scan(model, tok, samples=samples, format="mxfp4")
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {"model": model_spec, "format": "mxfp4", "modules": len(report.rows), "texts": samples,
           "load_s": load_s, "scan_s": wall, "phases_s": report.seconds}
    print(f"scan on CUDA: {len(report.rows)} modules, {samples} texts in {wall:.2f} s "
          f"(load {load_s:.1f} s; phases {report.seconds})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.environ.get("HWNOISE_GPU_MODEL", "default"))
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every section")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs CUDA (no CUDA device here)")
    if args.quick:
        args.size, args.repeats, args.batch, args.tokens, args.samples = 2048, 5, 2, 64, 2
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "hwnoise_compile": os.environ.get("HWNOISE_COMPILE", "1")}
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    print(json.dumps(info), flush=True)
    result = {"info": info}
    for name, run in (("formats", lambda: formats_section(args.size, args.repeats)),
                      ("noise", lambda: noise_section(args.model, args.batch, args.tokens, args.repeats)),
                      ("scan", lambda: scan_section(args.model, args.samples))):
        try:
            result[name] = run()
        except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others' figures
            import traceback

            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if args.json:  # after every section: a run cut short keeps what it measured
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
