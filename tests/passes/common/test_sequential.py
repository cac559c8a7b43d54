"""Sequential block-by-block calibration: bounded activation memory, SparseGPT/GPTQ over a model."""

from __future__ import annotations

import gc

import torch

from compressor.kernels.int4_format import fake_quantize_rtn
from compressor.passes.common.sequential import (
    BlockInput,
    capture_block_inputs,
    compress_linears_sequentially,
    sequential_calibrate,
)
from compressor.passes.quantize.gptq import gptq_quantize
from compressor.passes.sparsity.sparsegpt import magnitude_prune, sparsegpt_prune
from tests.helpers.tiny import model_output, tiny_llama, token_batches

BATCH, SEQ, HIDDEN = 4, 16, 64


def _fwd(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch)


def _live_hidden_bytes() -> int:
    """Bytes of every live tensor shaped like a block's hidden states, found by the
    garbage collector (independent of what the code under test reports)."""
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and tuple(obj.shape) == (BATCH, SEQ, HIDDEN):
            total += obj.numel() * obj.element_size()
    return total


def test_memory_is_bounded_by_one_block() -> None:
    layers, n_batches = 8, 3
    model = tiny_llama(layers=layers)
    batches = token_batches(n_batches, BATCH, SEQ)
    one_block = n_batches * BATCH * SEQ * HIDDEN * 4  # one block's inputs for all batches, fp32
    seen: list[int] = []

    def per_block(i: int, block: torch.nn.Module, inputs: list[BlockInput]) -> None:
        assert len(inputs) == n_batches
        seen.append(_live_hidden_bytes())

    stats = sequential_calibrate(model, model.model.layers, batches, _fwd, per_block)
    assert len(seen) == layers and stats.blocks == layers
    # the gc sees one block's inputs (plus at most one batch of stragglers), never all blocks' worth
    print(
        f"one block {one_block} B; live at each block max {max(seen)} B; reported peak {stats.peak_hidden_bytes} B"
    )
    assert max(seen) <= one_block + BATCH * SEQ * HIDDEN * 4
    assert stats.peak_hidden_bytes == 2 * one_block  # inputs + outputs while a block runs

    # the counter is able to see the naive approach: capture every layer's inputs at once
    naive: list[torch.Tensor] = []

    def keep_input(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        naive.append(args[0] if args else kwargs["hidden_states"])

    hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    assert _live_hidden_bytes() >= layers * one_block


def test_capture_stops_at_the_block() -> None:
    model = tiny_llama(layers=3)
    ran: list[int] = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i))
    captured = capture_block_inputs(model, model.model.layers[0], token_batches(2, BATCH, SEQ), _fwd)
    assert len(captured) == 2 and tuple(captured[0].hidden.shape) == (BATCH, SEQ, HIDDEN)
    assert ran == [0, 0]  # the hook on block 0 ran, no later block did
    assert "position_embeddings" in captured[0].kwargs


def test_noop_walk_reproduces_the_model() -> None:
    model = tiny_llama(layers=3)
    batches = token_batches(2, BATCH, SEQ)
    last: list[torch.Tensor] = []
    model.model.layers[-1].register_forward_hook(lambda _m, _a, out: last.append(out))
    with torch.no_grad():
        ref = [model(**b) for b in batches] and list(last)
    last.clear()
    sequential_calibrate(model, model.model.layers, batches, _fwd, lambda *_: None)
    assert len(last) == 2
    for got, want in zip(last, ref):
        torch.testing.assert_close(got, want)


def _model_error(model: torch.nn.Module, ref: list[torch.Tensor], held_out: list[dict]) -> float:
    out = [model_output(model, b) for b in held_out]
    return float(sum((o - r).norm() for o, r in zip(out, ref)) / sum(r.norm() for r in ref))


def test_sequential_sparsegpt_24_beats_magnitude_on_the_model() -> None:
    calib, held_out = token_batches(8, BATCH, SEQ, seed=1), token_batches(2, BATCH, SEQ, seed=2)
    base = tiny_llama(layers=4)
    ref = [model_output(base, b) for b in held_out]

    def sgpt(name: str, linear: torch.nn.Linear, hessian: torch.Tensor) -> None:
        linear.weight.copy_(sparsegpt_prune(linear.weight, hessian, prune_n=2, prune_m=4)[0])

    model = tiny_llama(layers=4)
    compress_linears_sequentially(model, model.model.layers, calib, _fwd, sgpt)
    for name, m in model.model.layers.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert bool(((m.weight == 0).reshape(m.out_features, -1, 4).sum(-1) >= 2).all()), name
    e_sgpt = _model_error(model, ref, held_out)

    mag = tiny_llama(layers=4)
    with torch.no_grad():
        for m in mag.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(magnitude_prune(m.weight, prune_n=2, prune_m=4)[0])
    e_mag = _model_error(mag, ref, held_out)
    print(f"model 2:4 logits rel err: sequential sparsegpt {e_sgpt:.4f} magnitude {e_mag:.4f}")
    assert e_sgpt < 0.9 * e_mag


def test_sequential_gptq_beats_rtn_on_the_model() -> None:
    calib, held_out = token_batches(8, BATCH, SEQ, seed=1), token_batches(2, BATCH, SEQ, seed=2)
    base = tiny_llama(layers=2)
    ref = [model_output(base, b) for b in held_out]

    def gptq(name: str, linear: torch.nn.Linear, hessian: torch.Tensor) -> None:
        linear.weight.copy_(gptq_quantize(linear.weight, hessian, bits=4, group_size=32).dequantize())

    model = tiny_llama(layers=2)
    compress_linears_sequentially(model, model.model.layers, calib, _fwd, gptq)
    e_gptq = _model_error(model, ref, held_out)
    rtn = tiny_llama(layers=2)
    with torch.no_grad():
        for m in rtn.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(fake_quantize_rtn(m.weight, 4, 32))
    e_rtn = _model_error(rtn, ref, held_out)
    print(f"model w4g32 logits rel err: sequential gptq {e_gptq:.4f} rtn {e_rtn:.4f}")
    assert e_gptq < 0.95 * e_rtn
