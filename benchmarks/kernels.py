"""GPU benchmark of the Triton GEMMs against the vendor paths, side by side in one run.

For each shape (M from 1 to 8192 on BERT-base and Llama-7B layer shapes):
- int8 W8A8: our ``scaled_gemm`` (int8 operands, fused per-token × per-channel
  epilogue, fp16 out) vs ``torch._int_mm`` (int32 out, no epilogue) and vs cuBLAS fp16
  ``F.linear``; the full ``w8a8_linear`` (activation quantization included) too;
- FP8 (sm_89+): our fp8 ``scaled_gemm`` vs ``torch._scaled_mm`` (per-tensor scales).
Times are ``triton.testing.do_bench`` medians; TFLOP/s = 2·M·N·K / time, and the % of
the target record's dense peak for that precision (``--target``). Results go to
``benchmarks/results/kernels_<gpu>.{json,md}``.

    python benchmarks/kernels.py --target h100 [--quick]

Needs a CUDA GPU; there is nothing to measure on the CPU (the kernels' correctness
tests run there under the Triton interpreter instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

LAYERS: dict[str, tuple[int, int]] = {  # name: (N, K) of the weight
    "bert-base qkv": (2304, 768),
    "bert-base ffn-up": (3072, 768),
    "bert-base ffn-down": (768, 3072),
    "llama-7b qkv": (12288, 4096),
    "llama-7b o": (4096, 4096),
    "llama-7b gate-up": (22016, 4096),
    "llama-7b down": (4096, 11008),
}
MS: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096, 8192)


def _bench(fn: Any) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_shape(m: int, n: int, k: int, fp8: bool) -> dict[str, Any]:
    from compressor.kernels.scaled_gemm import scaled_gemm
    from compressor.kernels.w8a8 import w8a8_linear

    dev = "cuda"
    x16 = torch.randn(m, k, device=dev, dtype=torch.float16)
    w16 = torch.randn(n, k, device=dev, dtype=torch.float16)
    a8 = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
    b8 = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    sa, sb = torch.rand(m, device=dev), torch.rand(n, device=dev)
    row: dict[str, Any] = {"M": m, "N": n, "K": k}
    ms = {
        "fp16_cublas": _bench(lambda: F.linear(x16, w16)),
        "int8_ours": _bench(lambda: scaled_gemm(a8, b8, sa, sb, None, "none", torch.float16)),
        "w8a8_linear_ours": _bench(lambda: w8a8_linear(x16, b8, sb)),
    }
    if m > 16:  # torch._int_mm needs M > 16
        b8_t = b8.t()
        ms["int8_torch_int_mm"] = _bench(lambda: torch._int_mm(a8, b8_t))
    if fp8:
        a_f8 = x16.to(torch.float8_e4m3fn)
        b_f8 = w16.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        ms["fp8_ours"] = _bench(lambda: scaled_gemm(a_f8, b_f8, sa, sb, None, "none", torch.float16))
        if m % 16 == 0:  # torch._scaled_mm needs M divisible by 16
            b_f8_t = b_f8.t()
            ms["fp8_torch_scaled_mm"] = _bench(
                lambda: torch._scaled_mm(a_f8, b_f8_t, scale_a=one, scale_b=one, out_dtype=torch.float16)
            )
    flops = 2.0 * m * n * k
    row["ms"] = ms
    row["tflops"] = {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()}
    if "int8_torch_int_mm" in ms:
        row["int8_vs_int_mm"] = ms["int8_torch_int_mm"] / ms["int8_ours"]
    row["int8_vs_fp16"] = ms["fp16_cublas"] / ms["int8_ours"]
    if "fp8_torch_scaled_mm" in ms:
        row["fp8_vs_scaled_mm"] = ms["fp8_torch_scaled_mm"] / ms["fp8_ours"]
    return row


def to_markdown(rows: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    lines = [
        "| layer | M | N | K | fp16 cuBLAS TFLOP/s | int8 ours TFLOP/s (% peak) | "
        "ours / _int_mm | ours / fp16 | fp8 ours / _scaled_mm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        t = r["tflops"]
        pct = f" ({100 * t['int8_ours'] / peaks['int8']:.0f}%)" if peaks.get("int8") else ""
        lines.append(
            f"| {r['layer']} | {r['M']} | {r['N']} | {r['K']} | {t['fp16_cublas']:.1f} | "
            f"{t['int8_ours']:.1f}{pct} | {r.get('int8_vs_int_mm', float('nan')):.2f}× | "
            f"{r['int8_vs_fp16']:.2f}× | {r.get('fp8_vs_scaled_mm', float('nan')):.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="h100", help="target record for the % of peak (a100, h100, orin)")
    p.add_argument("--quick", action="store_true", help="M in {1, 256, 4096} on two layer shapes")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    from compressor.targets import get_target

    target = get_target(args.target)
    cc = torch.cuda.get_device_capability()
    fp8 = cc >= (8, 9)
    layers = dict(list(LAYERS.items())[2:4]) if args.quick else LAYERS
    ms = (1, 256, 4096) if args.quick else MS
    rows = []
    for layer, (n, k) in layers.items():
        for m in ms:
            row = {"layer": layer, **bench_shape(m, n, k, fp8)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    result = {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(cc),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "target": target.name,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernels_{gpu}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"kernels_{gpu}.md").write_text(to_markdown(rows, dict(target.peak_tflops)))
    print(to_markdown(rows, dict(target.peak_tflops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
