"""W4A16 int4 GEMM: packing, kernel vs torch reference (plain and split-K), shape errors,
torch.library registration, and the arch specs lowering to tensor-core PTX.

On a CPU-only machine the kernel runs in Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``); shapes are small and irregular (N not a multiple of BLOCK_N,
M not a multiple of BLOCK_M).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.kernels import w4a16
from compressor.kernels.int4_format import (
    QuantizedWeight,
    dequantize_w4a16,
    pack_w4a16,
    quantize_rtn,
    unpack_w4a16,
)
from compressor.kernels.reference import w4a16_gemm_ref
from compressor.kernels.w4a16 import arch_specs, pick_config, pick_split_k, w4a16_linear
from tests.helpers.metrics import sqnr_db


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _weights(n: int, k: int, group_size: int, symmetric: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    return quantize_rtn(torch.randn(n, k, generator=g), bits=4, group_size=group_size, symmetric=symmetric)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_round_trip_is_exact(symmetric: bool) -> None:
    qw = _weights(48, 192, 32, symmetric)
    packed, scales, zeros = pack_w4a16(qw)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (192 // 8, 48)
    assert tuple(scales.shape) == (6, 48) and tuple(zeros.shape) == (6, 48) and zeros.dtype == torch.uint8
    offset = 8 if symmetric else 0
    assert torch.equal(unpack_w4a16(packed), qw.q.to(torch.int32).t() + offset)
    assert torch.equal(zeros.to(torch.int32), qw.zeros.to(torch.int32).t() + offset)
    assert torch.equal(dequantize_w4a16(packed, scales, zeros, 32), qw.dequantize().t())


def test_pack_rejects_non_int4() -> None:
    qw = quantize_rtn(torch.randn(16, 64), bits=8, group_size=32)
    with pytest.raises(ValueError, match="bits=8"):
        pack_w4a16(qw)


# (M, K, N, group_size): M 1 and 5 take split-K automatically; group 8 < BLOCK_K takes the
# per-row scale path of the kernel, the others one scale row per tile (several groups).
SHAPES = [(1, 192, 48, 32), (5, 192, 80, 64), (33, 192, 80, 32), (33, 128, 48, 8)]


@pytest.mark.parametrize("m,k,n,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(m: int, k: int, n: int, group_size: int, dtype: torch.dtype) -> None:
    qw = _weights(n, k, group_size, symmetric=(m % 2 == 1), seed=m + k)
    packed, scales, zeros = pack_w4a16(qw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    y = w4a16_linear(x, packed, scales, zeros, group_size, bias)
    ref = w4a16_gemm_ref(x, packed, scales, zeros, group_size, bias)
    assert y.dtype == dtype and tuple(y.shape) == (m, n)
    # fp32: same products, different summation order; fp16: plus one output rounding (2^-11).
    assert _rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    # And against the unpacked QuantizedWeight in float32: the int4 layout loses nothing.
    exact = x.float() @ qw.dequantize().t() + bias
    assert sqnr_db(exact, y) > (100.0 if dtype == torch.float32 else 50.0)


def test_split_k_matches_plain_kernel() -> None:
    m, k, n, group_size = 5, 192, 80, 32  # 6 K tiles of 32
    assert pick_split_k(m, n, k, pick_config(m, n, group_size), num_sms=108) > 1
    qw = _weights(n, k, group_size, symmetric=False, seed=3)
    packed, scales, zeros = pack_w4a16(qw)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(n)
    plain = w4a16_linear(x, packed, scales, zeros, group_size, bias, split_k=1)
    for split_k in (2, 3, 6, 16):  # 16 > K tiles: empty slices are dropped
        split = w4a16_linear(x, packed, scales, zeros, group_size, bias, split_k=split_k)
        assert _rel_err(split, plain) < 1e-6, split_k  # bias added once, not split_k times
    assert _rel_err(plain, w4a16_gemm_ref(x, packed, scales, zeros, group_size, bias)) < 1e-6


def test_leading_dims_and_registered_op() -> None:
    qw = _weights(48, 64, 32, symmetric=True)
    packed, scales, zeros = pack_w4a16(qw)
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    y = w4a16_linear(x, packed, scales, zeros, 32)
    assert tuple(y.shape) == (2, 3, 48)
    ref = w4a16_gemm_ref(x.reshape(6, 64), packed, scales, zeros, 32).reshape(2, 3, 48)
    assert _rel_err(y, ref) < 2e-3
    op = torch.ops.compressor.w4a16_linear
    assert _rel_err(op(x, packed, scales, zeros, 32, None, 1), ref) < 2e-3
    # The schema matches the function (mutates nothing, no aliasing). The fake-tensor and
    # torch.compile checks need a real JITFunction: the interpreter reads tensor data.
    report = torch.library.opcheck(
        op.default, (x, packed, scales, zeros, 32, None, None), test_utils=("test_schema",)
    )
    assert report == {"test_schema": "SUCCESS"}


def _operands(k: int = 64, n: int = 48, group_size: int = 32) -> dict[str, torch.Tensor]:
    packed, scales, zeros = pack_w4a16(_weights(n, k, group_size, symmetric=True))
    return {"packed": packed, "scales": scales, "zeros": zeros}


def test_bad_shapes_raise_value_error_naming_the_problem() -> None:
    ops = _operands()
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="K=72"):
        w4a16_linear(torch.randn(4, 72), **ops, group_size=32)
    with pytest.raises(ValueError, match="group_size=48 must be positive and divide K=64"):
        w4a16_linear(x, **ops, group_size=48)
    with pytest.raises(ValueError, match="scales shape"):
        w4a16_linear(x, ops["packed"], ops["scales"][:, :40], ops["zeros"], 32)
    with pytest.raises(ValueError, match="zeros shape"):
        w4a16_linear(x, ops["packed"], ops["scales"], ops["zeros"][:1], 32)
    with pytest.raises(ValueError, match="bias shape"):
        w4a16_linear(x, **ops, group_size=32, bias=torch.zeros(47))
    with pytest.raises(ValueError, match="packed must be int32"):
        w4a16_linear(x, ops["packed"].to(torch.int64), ops["scales"], ops["zeros"], 32)
    with pytest.raises(ValueError, match="split_k=0"):
        w4a16_linear(x, **ops, group_size=32, split_k=0)
    with pytest.raises(ValueError, match="x dtype"):
        w4a16_linear(x.double(), **ops, group_size=32)
    # group 24 divides K=48 but no power-of-two BLOCK_K fits it.
    ops48 = _operands(k=48, group_size=24)
    with pytest.raises(ValueError, match="group_size=24 is not supported"):
        w4a16_linear(torch.randn(4, 48), **ops48, group_size=24)


_BUILD_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from compressor.kernels.w4a16 import arch_specs

spec = {s.name: s for s in arch_specs()}[sys.argv[1]]
kernel = triton.compile(
    ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs),
    target=GPUTarget("cuda", int(sys.argv[2]), 32),
    options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
)
ptx = kernel.asm["ptx"]
print(json.dumps({"mma_sync": ptx.count("mma.sync"), "wgmma": ptx.count("wgmma"), "atom": ptx.count("atom.")}))
"""


def test_arch_specs_are_consistent() -> None:
    specs = {s.name: s for s in arch_specs()}
    assert set(specs) == {"w4a16_gemm_fp16_g128", "w4a16_gemm_splitk_fp16_g128"}
    for s in specs.values():
        assert s.fn is w4a16._w4a16_gemm_kernel
        constexpr_args = {name for name, kind in s.signature.items() if kind == "constexpr"}
        assert constexpr_args == set(s.constexprs), s.name
        assert s.signature["x_ptr"] == "*fp16" and s.tensor_core == "mma"
    assert specs["w4a16_gemm_splitk_fp16_g128"].constexprs["SPLIT_K"] > 1
    assert specs["w4a16_gemm_splitk_fp16_g128"].signature["y_ptr"] == "*fp32"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w4a16_gemm_fp16_g128", "w4a16_gemm_splitk_fp16_g128"])
def test_arch_spec_builds_mma_for_sm80(name: str, tmp_path: Path) -> None:
    """Compiles a spec for a real sm_80 target (PTX only, no GPU needed) in a fresh
    process without TRITON_INTERPRET: under the interpreter ``triton.language``'s own
    @jit helpers (tl.cdiv, ...) are interpreted functions that a real compile cannot call."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real build, not a cache hit
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT, name, "80"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["mma_sync"] > 0, counts
    split_k = "splitk" in name
    assert (counts["atom"] > 0) == split_k, counts  # only split-K reduces with atomics
