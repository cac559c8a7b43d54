"""Sequential (block-by-block) calibration: only one block's inputs are ever held.

The scheme of GPTQ and SparseGPT (Frantar et al. 2022; Frantar & Alistarh 2023): run
the model once up to its first block and keep that block's inputs for every
calibration batch; then, block by block, let a callback compress the block using its
inputs (e.g. accumulate Hessians of each Linear and run SparseGPT/GPTQ), run the
compressed block to get its outputs, and pass them on as the next block's inputs.
Errors of earlier blocks thus reach later ones, as they will at inference, and only
one block's inputs and outputs (plus, with ``device``, one block's weights on the
device) are alive at a time, so a model whose activations for all layers, or whose
weights, exceed device memory can still be calibrated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.passes.common.hessian import HessianAccumulator


@dataclass
class BlockInput:
    """The positional and keyword arguments one block was called with, for one batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs)
        return BlockInput(self.args, {**self.kwargs, "hidden_states": hidden})


@dataclass
class SequentialStats:
    blocks: int = 0
    batches: int = 0
    peak_hidden_bytes: int = 0  # largest total size of hidden states held at once
    per_block_seconds: list[float] = field(default_factory=list)


class _StopForward(Exception):
    pass


def _to(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]
) -> list[BlockInput]:
    """Run ``forward(model, batch)`` for each batch only as far as ``block``; return its inputs.

    The forward is stopped by an exception raised from a pre-hook on ``block``, so no
    later block runs.
    """
    captured: list[BlockInput] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(BlockInput(tuple(args), dict(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                forward(model, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def sequential_calibrate(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    per_block: Callable[[int, nn.Module, list[BlockInput]], None],
    device: torch.device | None = None,
) -> SequentialStats:
    """Walk ``blocks`` in order: ``per_block(i, block, inputs)`` may change block ``i``
    in place; then block ``i``'s outputs on ``inputs`` become block ``i+1``'s inputs.

    ``forward(model, batch)`` runs the whole model on one batch (it is stopped at the
    first block). With ``device``, each block is moved there for its turn and moved
    back to where it was afterwards, and its inputs live on ``device``.
    """
    stats = SequentialStats(blocks=len(blocks))
    inputs = capture_block_inputs(model, blocks[0], batches, forward)
    inputs = [BlockInput(_to(b.args, device), _to(b.kwargs, device)) for b in inputs]
    stats.batches = len(inputs)
    for i, block in enumerate(blocks):
        start = time.perf_counter()
        home = next((p.device for p in block.parameters()), None)
        if device is not None:
            block.to(device)
        per_block(i, block, inputs)
        outputs = [_block_output(block(*b.args, **b.kwargs)) for b in inputs]
        held = sum(b.hidden.numel() * b.hidden.element_size() for b in inputs)
        held += sum(o.numel() * o.element_size() for o in outputs)
        stats.peak_hidden_bytes = max(stats.peak_hidden_bytes, held)
        inputs = [b.with_hidden(o) for b, o in zip(inputs, outputs)]
        del outputs
        if device is not None and home is not None:
            block.to(home)
        stats.per_block_seconds.append(time.perf_counter() - start)
    return stats


def feed_linear_inputs(
    root: nn.Module, sinks: dict[str, Callable[[torch.Tensor], None]], run: Callable[[], None]
) -> None:
    """While ``run()`` runs, hand every input of the layer named ``name`` under ``root`` to
    ``sinks[name]`` (the hooks are removed afterwards, also on error)."""
    handles = []
    for name, sink in sinks.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], sink: Callable[[torch.Tensor], None] = sink) -> None:
            sink(args[0])

        handles.append(root.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_hessians(
    block: nn.Module, inputs: Sequence[BlockInput], linears: Sequence[str] | None = None
) -> dict[str, HessianAccumulator]:
    """Hessians of the named Linear layers of ``block`` (all of them by default) from one
    pass of the block over ``inputs``."""
    names = (
        linears if linears is not None else [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    )
    accs: dict[str, HessianAccumulator] = {}
    for name in names:
        lin = block.get_submodule(name)
        assert isinstance(lin, nn.Linear), f"{name} is not a Linear"
        accs[name] = HessianAccumulator(lin.in_features, lin.weight.device)

    def run() -> None:
        for b in inputs:
            block(*b.args, **b.kwargs)

    feed_linear_inputs(block, {name: acc.add_batch for name, acc in accs.items()}, run)
    return accs


def compress_linears_sequentially(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    compress: Callable[[str, nn.Linear, torch.Tensor], None],
    select: Callable[[str, nn.Linear], bool] | None = None,
    device: torch.device | None = None,
) -> SequentialStats:
    """Sequential calibration for Hessian-based methods: for each block, accumulate the
    Hessian of every selected Linear from the block's inputs and call
    ``compress(f"{block_index}.{name}", linear, hessian)``, which changes the Linear in
    place (e.g. ``linear.weight.copy_(sparsegpt_prune(linear.weight, hessian, ...)[0])``).
    """

    def per_block(i: int, block: nn.Module, inputs: list[BlockInput]) -> None:
        names = [
            n
            for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and (select is None or select(n, m))
        ]
        for name, acc in block_hessians(block, inputs, names).items():
            compress(f"{i}.{name}", block.get_submodule(name), acc.hessian)  # type: ignore[arg-type]

    return sequential_calibrate(model, blocks, batches, forward, per_block, device)
