"""The pass families. Importing this package registers every pass.

``PASSES`` maps a recipe's ``pass:`` name to its class.
"""

from __future__ import annotations

from compressor.pipeline import PASS_REGISTRY

PASSES = PASS_REGISTRY

from compressor.passes import (  # noqa: E402,F401  (registers the passes)
    distill,
    prune,
    quantize,
    schedulers,
    sparsify,
    step_reduction,
)

__all__ = ["PASSES"]
