"""The pass families. Importing this package registers every pass.

``PASSES`` maps a recipe's ``pass:`` name to its class.
"""

from __future__ import annotations

from compressor.passes import schedulers, step_reduction  # noqa: F401  (registers the diffusion passes)

from compressor.pipeline import PASS_REGISTRY

PASSES = PASS_REGISTRY

from compressor.passes import distill, prune, quantize, sparsify  # noqa: E402,F401  (registers the passes)

__all__ = ["PASSES"]
