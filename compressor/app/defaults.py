"""The shipped recipe each target compiles when no recipe is named (``compile``, ``tune``)."""

from __future__ import annotations

DEFAULT_RECIPE = "minilm-cpu-int8"  # target cpu (and no --target)
DEFAULT_GPU_RECIPE = "minilm-gpu-int8"  # --target a100 | h100 | orin: Q/DQ ONNX, TensorRT script, Triton


def default_recipe(target: str | None) -> str:
    """The shipped recipe `compile` runs without --recipe: what ``target`` deploys."""
    if target is None:
        return DEFAULT_RECIPE
    from compressor.targets import get_target

    return DEFAULT_GPU_RECIPE if get_target(target).device == "cuda" else DEFAULT_RECIPE
