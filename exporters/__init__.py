"""Exporters. Importing this package registers every exporter.

``EXPORTERS`` maps a recipe's ``format:`` name to its class.
"""

from __future__ import annotations

# Each import registers its exporter(s) in EXPORTER_REGISTRY.
from compressor.exporters import (  # noqa: F401
    aoti,  # aoti: AOTInductor package; torch_export: the ExportedProgram
    compressed_tensors,  # compressed_tensors: Hugging Face checkpoint for vLLM
    diffusers_pipeline,  # diffusers-pipeline
    onnx,  # onnx: ONNX Runtime flavour
    onnx_qdq,  # onnx_qdq: TensorRT flavour (explicit Q/DQ)
    tensorrt,  # tensorrt: engine build script (+ build where TensorRT exists)
    triton_server,  # triton_repository: Triton Inference Server model repository
)
from compressor.exporters.base import EXPORTER_REGISTRY

EXPORTERS = EXPORTER_REGISTRY

__all__ = ["EXPORTERS"]
