"""Selecting modules by name: ``targets`` / ``ignore`` patterns over module names.

Patterns are shell globs (``*.attention.*``) or, with a ``re:`` prefix, regular
expressions matched against the full dotted name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import torch
from torch import nn

from compressor.errors import PlanError


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_modules(
    model: nn.Module,
    targets: Sequence[str],
    ignore: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
    what: str = "pass",
) -> list[str]:
    """Names of modules of ``types`` matched by ``targets`` and not by ``ignore``.

    Every target pattern must match at least one module of the right type, so a typo
    in a recipe fails the plan instead of silently compressing nothing.
    """
    candidates = [n for n, m in model.named_modules() if isinstance(m, types)]
    for pattern in targets:
        if not any(matches(n, pattern) for n in candidates):
            sample = ", ".join(candidates[:4]) + (", ..." if len(candidates) > 4 else "")
            kinds = "/".join(t.__name__ for t in types)
            raise PlanError(
                f"{what}: target pattern {pattern!r} matches no {kinds} layer of the model "
                f"(layers look like: {sample})"
            )
    chosen = [n for n in candidates if any(matches(n, p) for p in targets)]
    return [n for n in chosen if not any(matches(n, p) for p in ignore)]


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    """The Linear (or Linear-like, e.g. Int8Linear) layer called ``name``."""
    m = model.get_submodule(name)
    if not isinstance(getattr(m, "weight", None), torch.Tensor):
        raise TypeError(f"{name} is a {type(m).__name__}, not a Linear layer")
    return m  # type: ignore[return-value]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def batch_invariance(model: nn.Module) -> dict[str, object]:
    """Whether each output row of ``model`` depends on its own input only, not on its batch-mates.

    A layer that quantizes its activations with one dynamic scale over the whole tensor
    (``act_scheme == "dynamic_per_tensor"``: ONNX Runtime's ``DynamicQuantizeLinear``, FP8)
    takes that scale from every row of the batch, padding included, so a sentence's output
    moves with the longest sentence beside it. Per-token and calibrated static scales do not."""
    shared = [
        name for name, m in model.named_modules() if getattr(m, "act_scheme", None) == "dynamic_per_tensor"
    ]
    out: dict[str, object] = {"batch_invariant": not shared}
    if shared:
        out["why_not"] = f"{len(shared)} layers scale their activations per tensor (e.g. {shared[0]})"
    return out
