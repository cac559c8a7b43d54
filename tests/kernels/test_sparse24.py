"""2:4 compression kernel (CUTLASS layout) and Sparse24Linear, on CPU.

The Triton kernel runs under the interpreter (conftest sets TRITON_INTERPRET=1 without
a GPU) and must match torch's pure-torch CUTLASS conversion bit for bit; the arch
specs are compiled for real GPUs in a subprocess without the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

from compressor.kernels.sparse24 import sparse24_compress
from compressor.kernels.sparse24_format import (
    FORMATS,
    is_24_sparse,
    sparse24_compress_ref,
    sparse24_decompress,
    sparse24_metadata_bytes,
)
from compressor.kernels.sparse24_linear import Sparse24Linear


def random_sparse(
    n: int, k: int, dtype: torch.dtype, seed: int = 0, group: int = 4, keep: int = 2
) -> torch.Tensor:
    """A random weight with at most ``keep`` non-zeros per ``group`` along K; some groups hold
    fewer (so CUTLASS's filler encodings are exercised), and floats get some ``-0.0`` zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 3
    if dtype == torch.int8:
        w = (w * 20).round().clamp(-127, 127)
    w = w.to(dtype)
    order = torch.rand(n, k // group, group, generator=g).argsort(-1)[..., :keep]
    mask = torch.zeros(n, k // group, group, dtype=torch.bool).scatter_(-1, order, True)
    mask &= torch.rand(n, k // group, group, generator=g) > 0.3
    mask = mask.reshape(n, k)
    zeros = torch.zeros((), dtype=dtype)
    if dtype.is_floating_point:
        neg = torch.rand(n, k, generator=g) < 0.5
        zeros = torch.where(neg, torch.tensor(-0.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    return torch.where(mask, w, zeros)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t``: equality of these is bit-equality (``-0.0`` vs ``0.0`` too)."""
    return t.contiguous().view(torch.uint8)


CASES = [
    (torch.float16, 32, 64),
    (torch.float16, 96, 192),
    (torch.bfloat16, 64, 128),
    (torch.int8, 16, 128),
    (torch.int8, 48, 256),
]


@pytest.mark.parametrize(("dtype", "n", "k"), CASES)
def test_compress_bit_equal_to_torch_cutlass_reference(dtype: torch.dtype, n: int, k: int) -> None:
    w = random_sparse(n, k, dtype, seed=n + k)
    values, meta = sparse24_compress(w)
    ref_values, ref_meta = sparse24_compress_ref(w)
    assert values.shape == (n, k // 2) and values.dtype == dtype
    assert meta.dtype == FORMATS[dtype].meta_dtype == ref_meta.dtype
    assert meta.shape == ref_meta.shape
    assert torch.equal(bits(values), bits(ref_values))
    assert torch.equal(meta, ref_meta)


@pytest.mark.parametrize(("n", "k"), [(32, 32), (64, 96)])
def test_compress_fp32_one_of_two_bit_equal(n: int, k: int) -> None:
    w = random_sparse(n, k, torch.float32, seed=7, group=2, keep=1)
    values, meta = sparse24_compress(w)
    ref_values, ref_meta = sparse24_compress_ref(w)
    assert torch.equal(bits(values), bits(ref_values))
    assert torch.equal(meta, ref_meta)


def test_compress_non_contiguous_input() -> None:
    w = random_sparse(64, 64, torch.float16, seed=3)
    wt = w.t().contiguous().t()  # same values, column-major storage
    assert not wt.is_contiguous()
    values, meta = sparse24_compress(wt)
    ref_values, ref_meta = sparse24_compress_ref(w)
    assert torch.equal(bits(values), bits(ref_values)) and torch.equal(meta, ref_meta)


def test_known_metadata_word() -> None:
    # every group [0, 0, a, b]: code idx0 | idx1 << 2 = 2 | 3 << 2 = 0b1110 in each of the
    # four nibbles of an int16: 0xEEEE = -4370 (torch's to_sparse_semi_structured docstring)
    w = torch.tensor([0.0, 0.0, 1.0, 2.0]).repeat(32, 16).half()  # [32, 64]
    values, meta = sparse24_compress(w)
    assert torch.equal(values, torch.tensor([1.0, 2.0]).repeat(32, 16).half())
    assert bool((meta == -4370).all())


@pytest.mark.parametrize(("dtype", "n", "k"), [*CASES, (torch.float32, 32, 64)])
def test_round_trip_restores_dense(dtype: torch.dtype, n: int, k: int) -> None:
    is_fp32 = dtype == torch.float32
    w = random_sparse(n, k, dtype, seed=11, group=2 if is_fp32 else 4, keep=1 if is_fp32 else 2)
    w = torch.where(w == 0, torch.zeros((), dtype=dtype), w)  # +0.0 only: then the bits must match
    values, meta = sparse24_compress(w)
    assert torch.equal(bits(sparse24_decompress(values, meta)), bits(w))
    if not is_fp32:
        # the same as torch's own decompression (whose float32 branch is not bit-exact:
        # see sparse24_decompress)
        assert torch.equal(bits(sparse_semi_structured_to_dense_cutlass(values, meta)), bits(w))


def test_is_24_sparse() -> None:
    w = random_sparse(32, 64, torch.float16)
    assert is_24_sparse(w)
    assert is_24_sparse(torch.zeros(4, 8))
    dense = w.clone()
    dense[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # three non-zeros in one group
    assert not is_24_sparse(dense)
    assert not is_24_sparse(torch.zeros(4, 6))  # K not a multiple of 4
    # -0.0 is zero
    assert is_24_sparse(torch.tensor([[1.0, -0.0, 2.0, -0.0]]))


def test_non_24_input_raises() -> None:
    w = random_sparse(32, 64, torch.float16)
    w[3, 4:8] = 1.0
    with pytest.raises(ValueError, match=r"not 2:4 sparse: 1 of 512 groups"):
        sparse24_compress(w)
    w32 = random_sparse(32, 32, torch.float32)  # 2:4 but not 1:2
    with pytest.raises(ValueError, match="1:2"):
        sparse24_compress(w32)


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((16, 64), torch.float16, "N a multiple of 32"),
        ((32, 48), torch.float16, "K a multiple of 64"),
        ((16, 64), torch.int8, "K a multiple of 128"),
        ((8, 128), torch.int8, "N a multiple of 16"),
        ((2, 32, 64), torch.float16, "2-D"),
        ((32, 64), torch.float64, "dtype torch.float64"),
    ],
)
def test_bad_input_raises(shape: tuple[int, ...], dtype: torch.dtype, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sparse24_compress(torch.zeros(shape, dtype=dtype))


def test_metadata_bytes() -> None:
    # fp16: one int16 per 16 weights; int8: one int32 per 32 weights
    assert sparse24_metadata_bytes(64, 128, torch.float16) == 64 * 8 * 2
    assert sparse24_metadata_bytes(32, 256, torch.int8) == 32 * 8 * 4


# --------------------------------------------------------------------------- Sparse24Linear


def sparse_linear(n: int, k: int, seed: int = 0) -> nn.Linear:
    """An fp32 Linear with a 2:4 weight whose values are exact in fp16."""
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(random_sparse(n, k, torch.float16, seed=seed).float())
    return lin


def test_sparse24_linear_cpu_equals_masked_dense() -> None:
    lin = sparse_linear(64, 128)
    m = Sparse24Linear.from_linear(lin)
    assert m.values.dtype == torch.float16 and m.resolve_backend(torch.device("cpu")) == "reference"
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    assert torch.equal(m.dense_weight().float(), lin.weight.detach())


def test_sparse24_linear_fp32_one_of_two_exact() -> None:
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(random_sparse(32, 64, torch.float32, seed=2, group=2, keep=1))
    m = Sparse24Linear.from_linear(lin, dtype=torch.float32)
    assert m.values.dtype == torch.float32 and m.meta.shape == (32, 8)
    x = torch.randn(6, 64)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)


def test_sparse24_linear_uses_weight_mask() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(64, 32).half()
    mask = (random_sparse(32, 64, torch.float16, seed=5) != 0).half()
    lin.weight_mask = mask  # what a pruning pass leaves
    assert not is_24_sparse(lin.weight)
    m = Sparse24Linear.from_linear(lin)
    assert m.values.dtype == torch.float16
    x = torch.randn(7, 64).half()
    ref = F.linear(x.float(), (lin.weight * mask).float(), lin.bias.float()).half()
    y = m(x)
    assert y.dtype == torch.float16
    # the reference multiplies in x's dtype; same weights, so only fp16 GEMM rounding differs
    err = (y.float() - ref.float()).norm() / ref.float().norm()
    assert err < 2e-3, err


def test_sparse24_linear_weight_bytes() -> None:
    m = Sparse24Linear.from_linear(sparse_linear(64, 128))
    # values fp16 [64, 64] + meta int16 [64, 8] + fp32 bias
    assert m.weight_bytes() == 64 * 64 * 2 + 64 * 8 * 2 + 64 * 4
    assert m.weight_bytes() < 0.6 * (64 * 128 * 2 + 64 * 4)


def test_sparse24_linear_rejects_dense_and_bad_shapes() -> None:
    lin = nn.Linear(128, 64)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        Sparse24Linear.from_linear(lin)
    with pytest.raises(ValueError, match="in_features a multiple of 64"):
        Sparse24Linear.from_linear(nn.Linear(32, 64))
    with pytest.raises(ValueError, match="backend 'triton'"):
        Sparse24Linear(128, 64, backend="triton")
    m = Sparse24Linear.from_linear(sparse_linear(64, 128), backend="cutlass")
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        m(torch.randn(2, 128))


def test_sparse24_linear_state_dict_round_trip_refreshes_cache() -> None:
    a = Sparse24Linear.from_linear(sparse_linear(64, 128, seed=0))
    b = Sparse24Linear.from_linear(sparse_linear(64, 128, seed=1))
    x = torch.randn(4, 128)
    ya = a(x)
    assert not torch.equal(b(x), ya)  # b's cached weight is now b's
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"values", "meta", "bias"}
    torch.testing.assert_close(b(x), ya, rtol=0, atol=0)


def test_cutlass_tensor_from_our_compression() -> None:
    # The GPU path wraps our (values, meta) in torch's CUTLASS tensor subclass; its
    # to_dense (torch's reference decompression, CPU-capable) must give back the weight.
    lin = sparse_linear(64, 128)
    m = Sparse24Linear.from_linear(lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "prototype API" notice
        w = m._weight_for("cutlass")
    assert isinstance(w, torch.sparse.SparseSemiStructuredTensorCUTLASS)
    assert w.shape == (64, 128)
    assert torch.equal(w.to_dense().float(), lin.weight.detach())


# --------------------------------------------------------------------------- arch specs


@pytest.mark.slow
def test_arch_specs_build_for_sm80_without_interpreter() -> None:
    code = textwrap.dedent(
        """
        import json
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from compressor.kernels.sparse24 import arch_specs

        out = {}
        for s in arch_specs():
            for cc in (80, 90) if s.name.endswith("fp16") else (80,):
                k = triton.compile(
                    ASTSource(fn=s.fn, signature=s.signature, constexprs=s.constexprs),
                    target=GPUTarget("cuda", cc, 32),
                    options={"num_warps": s.num_warps, "num_stages": s.num_stages},
                )
                ptx = k.asm["ptx"]
                out[f"{s.name}@{cc}"] = [ptx.count("st.global"), ptx.count("ld.global")]
        print(json.dumps(out))
        """
    )
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(built) == {
        "sparse24_compress_fp16@80",
        "sparse24_compress_fp16@90",
        "sparse24_compress_fp32@80",
        "sparse24_compress_int8@80",
    }
    for name, (stores, loads) in built.items():
        assert stores > 0 and loads > 0, name


def test_arch_specs_contract() -> None:
    from compressor.kernels.sparse24 import arch_specs

    specs = arch_specs()
    assert {s.name for s in specs} == {
        "sparse24_compress_fp16",
        "sparse24_compress_fp32",
        "sparse24_compress_int8",
    }
    for s in specs:
        assert s.tensor_core is None and s.min_cc == 80
        assert set(s.constexprs) == {k for k, v in s.signature.items() if v == "constexpr"}
