"""Whether Triton is installed: the one switch between the Triton kernels and their references.

Triton is the optional ``kernels`` extra (``pip install -e ".[kernels]"``). Only the kernel
files (``scaled_gemm``, ``w8a8``, ``fp8_gemm``, ``w4a16``, ``sparse24`` and the arch report)
import it, at module level; everything else in ``compressor.kernels`` (the weight formats,
the runtime layers, the pure-torch references in ``reference.py``) is plain torch. The
layers (``Int4Linear``, ``Int8Linear``, ``Fp8Linear``, ``Sparse24Linear``) read
``HAS_TRITON`` to choose the kernel or the reference, and import a kernel file only when
it is true. Nothing is imported here: ``find_spec`` only looks for the package.
"""

from __future__ import annotations

import importlib.util

KERNELS_EXTRA = 'pip install -e ".[kernels]"'


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a None in sys.modules
        return False


HAS_TRITON: bool = _find_triton()
