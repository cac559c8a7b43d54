"""Model adapters: what the pipeline needs to know about a model family."""

from __future__ import annotations

from compressor.adapters.base import ModelAdapter
from compressor.errors import RecipeError


def make_adapter(name: str, source: str | None = None) -> ModelAdapter:
    """The adapter for a recipe's ``model.adapter``. ``auto`` reads the model folder's
    config: a ``*ForCausalLM`` architecture gets the causal-LM adapter, anything else the
    BERT-style encoder adapter."""
    if name == "auto" and source is not None and source != "default":
        from pathlib import Path

        from compressor.adapters.causal_lm import is_causal_lm_folder

        if is_causal_lm_folder(Path(source)):
            name = "hf-causal-lm"
    if name in ("auto", "hf-encoder"):
        from compressor.adapters.hf_encoder import HFEncoderAdapter

        return HFEncoderAdapter()
    if name == "hf-causal-lm":
        from compressor.adapters.causal_lm import CausalLMAdapter

        return CausalLMAdapter()
    if name == "diffusers":
        from compressor.adapters.diffusion.adapter import DiffusersAdapter

        return DiffusersAdapter()
    raise RecipeError(f"model.adapter: unknown adapter {name!r}")
