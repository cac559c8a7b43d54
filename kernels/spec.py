"""What a Triton kernel module tells the arch report (``compressor kernels``).

Each kernel module exposes ``arch_specs() -> list[KernelSpec]``: one entry per kernel
specialisation worth building (e.g. the int8 GEMM with and without a fused GELU). The
report compiles each for every requested GPU architecture with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))``
and reads the PTX for the tensor-core instructions it expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    """One kernel specialisation to build per architecture.

    ``fn`` is the ``@triton.jit`` function (or, under ``TRITON_INTERPRET=1``, whatever
    ``triton.jit`` returned: the report recovers the plain Python function from it).
    ``signature`` maps every non-constexpr argument name to its Triton type string
    (``"*i8"``, ``"*fp16"``, ``"i32"``, ``"fp32"``) and constexpr arguments to
    ``"constexpr"``; ``constexprs`` gives the constexpr values. ``min_cc`` is the oldest
    compute capability the kernel supports (89 for FP8); ``tensor_core`` names the
    instruction family its PTX must contain on a capable arch (``"mma"``; on sm_90 a
    Triton GEMM may use ``"wgmma"`` instead, which the report accepts), or ``None`` for a
    kernel without a GEMM (quantization, packing).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    min_cc: int = 80
    tensor_core: str | None = "mma"
    num_warps: int = 4
    num_stages: int = 3
