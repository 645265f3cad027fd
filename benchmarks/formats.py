"""Round-trip speed of each format on a 4096x4096 fp32 tensor, against named baselines measured in
the same run:

- copy_  : `y.copy_(x)` into a preallocated tensor (the memory floor);
- clone  : `x.clone()` (allocation + copy: the floor for any function that returns a new tensor);
- torchao: torchao 0.18's emulated path, `MXTensor.to_mx(...).dequantize()` / `NVFP4Tensor`.

hwnoise is timed both ways: `quantize(x, fmt)` (new tensor; compare with clone) and
`quantize(x, fmt, out=y)` (preallocated; compare with copy_). The first call of each format
compiles its kernel (torch.compile); that one-off cost is reported separately.

Run: python benchmarks/formats.py [--size 4096] [--repeats 5] [--formats mxfp4,nvfp4,...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import hwnoise as hn

DEFAULT = "mxfp4,nvfp4,hif4,mxfp6_e2m3,mxfp8_e4m3,mxint8,fp8_e4m3,bf16"


def timeit(fn, repeats: int) -> float:
    """Median of `repeats` timed calls after one warm-up call (seconds)."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def torchao_round_trip(fmt: str):
    """A zero-argument callable factory for torchao's emulated round trip, or None."""
    try:
        from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError:
        return None
    mx = {"mxfp4": torch.float4_e2m1fn_x2, "mxfp6_e2m3": DTYPE_FP6_E2M3, "mxfp8_e4m3": torch.float8_e4m3fn}
    if fmt in mx:
        return lambda x: MXTensor.to_mx(x, mx[fmt], 32).dequantize(torch.float32)
    if fmt == "nvfp4":
        return lambda x: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())) \
            .dequantize(torch.float32)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--formats", default=DEFAULT)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    y = torch.empty_like(x)
    console = Console()
    console.print(f"{args.size}x{args.size} fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")

    copy_s = timeit(lambda: y.copy_(x), args.repeats)
    clone_s = timeit(lambda: x.clone(), args.repeats)
    rows = []
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        hn.quantize(x, fmt)  # first call: compiles this format's kernel
        first_s = time.perf_counter() - t0
        new_s = timeit(lambda: hn.quantize(x, fmt), args.repeats)
        hn.quantize(x, fmt, out=y)  # compiles the out= variant
        out_s = timeit(lambda: hn.quantize(x, fmt, out=y), args.repeats)
        ref = torchao_round_trip(fmt)
        ao_s = timeit(lambda: ref(x), max(1, args.repeats // 2)) if ref else None
        rows.append({"format": fmt, "first_call_s": first_s, "quantize_s": new_s, "quantize_out_s": out_s,
                     "torchao_s": ao_s, "out_vs_copy": out_s / copy_s, "new_vs_clone": new_s / clone_s,
                     "torchao_vs_hwnoise": (ao_s / new_s) if ao_s else None})

    table = Table(title="Fake-quant round trip (median ms); ratios against baselines from this run")
    for col in ("format", "first call (compile) s", "quantize ms", "vs clone", "quantize(out=) ms",
                "vs copy_", "torchao ms", "torchao / hwnoise"):
        table.add_column(col, justify="right" if col != "format" else "left")
    for r in rows:
        table.add_row(r["format"], f"{r['first_call_s']:.1f}", f"{1e3 * r['quantize_s']:.1f}",
                      f"{r['new_vs_clone']:.2f}x", f"{1e3 * r['quantize_out_s']:.1f}", f"{r['out_vs_copy']:.2f}x",
                      f"{1e3 * r['torchao_s']:.0f}" if r["torchao_s"] else "-",
                      f"{r['torchao_vs_hwnoise']:.1f}x" if r["torchao_vs_hwnoise"] else "-")
    console.print(table)
    console.print(f"baselines: copy_ {1e3 * copy_s:.1f} ms, clone {1e3 * clone_s:.1f} ms")
    console.print("targets: mxfp4 and nvfp4 >= 10x faster than torchao, quantize(out=) within 6x of copy_")
    if args.json:
        from hwnoise.io import atomic_write_json

        atomic_write_json(args.json, {"size": args.size, "copy_s": copy_s, "clone_s": clone_s, "rows": rows})


if __name__ == "__main__":
    main()
