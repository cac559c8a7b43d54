"""The pass families. Importing this package registers every pass.

``PASSES`` maps a recipe's ``pass:`` name to its class.
"""

from __future__ import annotations

from compressor.pipeline import PASS_REGISTRY

PASSES = PASS_REGISTRY

from compressor.passes.diffusion import (  # noqa: E402,F401
    adaptive_guidance,
    consistency_distill,
    guidance_distill,
    progressive_distill,
    scheduler,
)
from compressor.passes.distill import distill  # noqa: E402,F401
from compressor.passes.prune import prune  # noqa: E402,F401
from compressor.passes.quantize import quantize  # noqa: E402,F401
from compressor.passes.sparsity import sparsify  # noqa: E402,F401

__all__ = ["PASSES"]
