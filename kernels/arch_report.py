"""Build every Triton kernel for each GPU architecture and report its tensor-core use.

``compressor kernels --arch sm_80,sm_87,sm_90`` answers, before a bundle ships to an
Orin or an H100, "does each kernel compile for that GPU, and does its GEMM actually use
the tensor cores?". No GPU is needed: ``triton.compile`` with
``GPUTarget("cuda", cc, 32)`` lowers a kernel to PTX for any architecture, and the PTX
names the instructions: ``mma.sync`` (Ampere / Orin tensor cores), ``wgmma.mma_async``
(Hopper warp-group MMA). A GEMM kernel whose PTX has neither would run on the CUDA
cores: the report marks it failed. Kernels below their ``min_cc`` (FP8 below sm_89)
are reported as not applicable.

Each kernel module lists its specialisations in ``arch_specs()`` (``KernelSpec``).
Under ``TRITON_INTERPRET=1`` ``@triton.jit`` yields interpreter objects that cannot be
compiled, so the report then runs itself in a subprocess without that variable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from compressor.kernels.spec import KernelSpec

KERNEL_MODULES: tuple[str, ...] = (
    "compressor.kernels.scaled_gemm",
    "compressor.kernels.w8a8",
    "compressor.kernels.w4a16",
    "compressor.kernels.sparse24",
)

_INSTRUCTION = re.compile(r"\b(wgmma\.mma_async\.[\w.]+|mma\.sync\.[\w.]+)")


def parse_arch(arch: str) -> int:
    """``sm_90`` / ``sm90`` / ``90`` → 90."""
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})", arch.strip().lower())
    if not m:
        raise ValueError(f"kernels: {arch!r} is not a CUDA architecture like sm_80, sm_87 or sm_90")
    return int(m.group(1))


def all_specs() -> list[KernelSpec]:
    specs: list[KernelSpec] = []
    for name in KERNEL_MODULES:
        specs.extend(importlib.import_module(name).arch_specs())
    return specs


def tensor_core_instructions(ptx: str) -> list[str]:
    """The distinct MMA opcodes in ``ptx`` (e.g. ``mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32``)."""
    return sorted(set(_INSTRUCTION.findall(ptx)))


def build_one(spec: KernelSpec, cc: int) -> dict[str, Any]:
    """Compile ``spec`` for ``sm_<cc>`` and classify its PTX."""
    row: dict[str, Any] = {"kernel": spec.name, "arch": f"sm_{cc}", "instructions": []}
    if cc < spec.min_cc:
        return {**row, "status": f"n/a (needs sm_{spec.min_cc}+)", "ok": True}
    # constexprs by argument index: the form every Triton 3.x ASTSource accepts
    constexprs = {(spec.fn.arg_names.index(k),): v for k, v in spec.constexprs.items()}
    start = time.perf_counter()
    try:
        compiled = triton_compile(
            ASTSource(spec.fn, spec.signature, constexprs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as e:  # noqa: BLE001 - any compiler failure is the finding
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {**row, "status": "failed", "ok": False, "error": first[:200]}
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["instructions"] = tensor_core_instructions(compiled.asm["ptx"])
    if spec.tensor_core is None:
        return {**row, "status": "built", "ok": True}
    kinds = {i.split(".")[0] for i in row["instructions"]}
    if kinds & {"mma", "wgmma"}:
        return {**row, "status": "tensor cores", "ok": True}
    return {**row, "status": "no tensor-core instructions", "ok": False}


def build_arch_report(archs: list[str]) -> list[dict[str, Any]]:
    """One row per kernel specialisation and architecture."""
    ccs = [parse_arch(a) for a in archs]
    if not ccs:
        raise ValueError("kernels: no architecture given (e.g. --arch sm_80,sm_87,sm_90)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "compressor.kernels.arch_report",
                "--json",
                ",".join(f"sm_{c}" for c in ccs),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"kernels: the arch build subprocess failed:\n{out.stderr[-2000:]}")
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows
    return [build_one(spec, cc) for spec in all_specs() for cc in ccs]


def format_arch_report(rows: list[dict[str, Any]]) -> str:
    """A text table: kernel, arch, status, tensor-core opcodes."""
    header = ("kernel", "arch", "status", "tensor-core instructions")
    lines = [
        (r["kernel"], r["arch"], r["status"], ", ".join(r["instructions"]) or r.get("error", "-"))
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    failed = sum(not r["ok"] for r in rows)
    out.append(f"{len(rows) - failed} of {len(rows)} ok" + (f"; {failed} FAILED" if failed else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archs", help="comma-separated, e.g. sm_80,sm_87,sm_90")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    rows = build_arch_report([a for a in args.archs.split(",") if a.strip()])
    print(json.dumps(rows) if args.json else format_arch_report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
