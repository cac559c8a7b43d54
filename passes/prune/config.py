"""The options of the ``prune`` pass."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import option
from compressor.distill.config import RecoverConfig
from compressor.errors import RecipeError
from compressor.passes.prune.importance import LayerMethod, UnitMethod


@dataclass(frozen=True)
class StructuredPruneConfig:
    """Options of the ``prune`` pass."""

    heads: int | float | None = option(
        None,
        help="attention heads to keep per layer: an integer count, or a fraction (0, 1] of the "
        "original; null keeps all. Llama/Qwen-style decoders only (BERT's config cannot express it); "
        "with grouped-query attention it must be a multiple of num_key_value_heads",
    )
    ffn: int | float | None = option(
        None, help="FFN intermediate channels to keep per layer: a count or a fraction (0, 1]; null keeps all"
    )
    layers: int | float | None = option(
        None, help="transformer layers to keep: a count or a fraction (0, 1]; null keeps all"
    )
    ffn_multiple_of: int = option(
        1, help="round the FFN width to a multiple of this (e.g. 64 for tensor-core friendly GEMMs)", ge=1
    )
    importance: UnitMethod = option(
        "activation",
        help="how heads and FFN channels are scored: 'activation' (Minitron, on calibration data), "
        "'magnitude' (weight norms, data-free) or 'random' (a baseline)",
    )
    layer_importance: LayerMethod = option(
        "cosine",
        help="how layers are scored: 'cosine' (1 - cos(input, output), ShortGPT block importance), "
        "'relative_change' (||out - in|| / ||in||) or 'random'",
    )
    calibration_batches: int = option(8, help="calibration batches used to score units", ge=1, le=10_000)
    recover: RecoverConfig | None = option(
        None, help="distill against the original model right after this pass (steps, lr, loss)"
    )

    def validate(self, path: str) -> None:
        for name in ("heads", "ffn", "layers"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise RecipeError(f"{path}.{name}: fraction {value} must be in (0, 1]")
            if isinstance(value, int) and value < 1:
                raise RecipeError(f"{path}.{name}: must keep at least 1, got {value}")
        if self.ffn_multiple_of < 1:
            raise RecipeError(f"{path}.ffn_multiple_of: must be at least 1")
        if self.calibration_batches < 1:
            raise RecipeError(f"{path}.calibration_batches: must be at least 1")
