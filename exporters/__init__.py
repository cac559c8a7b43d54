"""Exporters. Importing this package registers every exporter.

``EXPORTERS`` maps a recipe's ``format:`` name to its class.
"""

from __future__ import annotations

from compressor.exporters import diffusers_pipeline  # noqa: F401  (registers diffusers-pipeline)
from compressor.exporters.base import EXPORTER_REGISTRY

EXPORTERS = EXPORTER_REGISTRY

__all__ = ["EXPORTERS"]

from compressor.exporters import onnx  # noqa: E402,F401  (registers the exporter)
