"""The errors a user sees. Each names what is wrong and what to do about it."""

from __future__ import annotations


class CompressorError(Exception):
    """Base class: an error meant for the user, printed without a traceback by the CLI."""


class RecipeError(CompressorError):
    """A recipe that cannot be read: bad YAML, an unknown key, a value of the wrong type."""


class PlanError(CompressorError):
    """A recipe that reads fine but asks for something illegal or impossible on its target."""


class PassError(CompressorError):
    """A pass that failed its own invariant (``ensures``) or could not run."""


class ExportError(CompressorError):
    """An exporter whose artifact failed verification (e.g. ONNX Runtime disagrees with torch)."""


class DataError(CompressorError):
    """Calibration or evaluation data that cannot be used (empty, NaN, wrong shape)."""
