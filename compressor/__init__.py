"""compressor: an inference-optimized model compression compiler.

A recipe names a model, a target and an ordered list of passes; the pipeline runs
each pass under a context, measures the model after every pass, and hands the result
to exporters that write a verified bundle.
"""

from __future__ import annotations

__version__ = "0.1.0"
