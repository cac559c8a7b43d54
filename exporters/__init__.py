"""Exporters. Importing this package registers every exporter.

``EXPORTERS`` maps a recipe's ``format:`` name to its class.
"""

from __future__ import annotations

import compressor.exporters.onnx.onnx  # noqa: F401  onnx: ONNX Runtime flavour
import compressor.exporters.onnx.onnx_genai  # noqa: F401  onnx_genai: with a KV cache, for ONNX Runtime GenAI
import compressor.exporters.onnx.onnx_qdq  # noqa: F401  onnx_qdq: TensorRT's explicit Q/DQ

# Each import registers its exporter(s) in EXPORTER_REGISTRY.
from compressor.exporters import (  # noqa: F401
    aoti,  # aoti: AOTInductor package
    compressed_tensors,  # compressed_tensors: Hugging Face checkpoint for vLLM
    diffusers_pipeline,  # diffusers-pipeline
    tensorrt,  # tensorrt: engine build script (+ build where TensorRT exists)
    torch_export,  # torch_export: the ExportedProgram
    triton_repository,  # triton_repository: Triton Inference Server model repository
)
from compressor.exporters.base import EXPORTER_REGISTRY

EXPORTERS = EXPORTER_REGISTRY

__all__ = ["EXPORTERS"]
