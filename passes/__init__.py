"""The pass families. Importing this package registers every pass.

``PASSES`` maps a recipe's ``pass:`` name to its class.
"""

from __future__ import annotations

from compressor.passes import (  # noqa: F401  (registers the diffusion passes)
    prune,  # noqa: F401
    schedulers,
    step_reduction,
)

from compressor.pipeline import PASS_REGISTRY

PASSES = PASS_REGISTRY

__all__ = ["PASSES"]

from compressor.passes import distill, quantize, sparsify  # noqa: E402,F401  (registers the passes)
