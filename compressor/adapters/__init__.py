"""Model adapters: what the pipeline needs to know about a model family."""

from __future__ import annotations

from compressor.adapters.base import ModelAdapter
from compressor.errors import RecipeError


def make_adapter(name: str) -> ModelAdapter:
    """The adapter for a recipe's ``model.adapter`` (``auto`` resolves to the HF encoder here)."""
    if name in ("auto", "hf-encoder"):
        from compressor.adapters.hf_encoder import HFEncoderAdapter

        return HFEncoderAdapter()
    if name == "diffusers":
        from compressor.adapters.diffusion import DiffusersAdapter

        return DiffusersAdapter()
    raise RecipeError(f"model.adapter: unknown adapter {name!r}")
