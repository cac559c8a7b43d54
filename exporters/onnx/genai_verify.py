"""The `onnx_genai` export's verification: the cached graph stepped in ONNX Runtime, then greedy
generation in ONNX Runtime GenAI against transformers' ``generate`` (what is checked is
described in ``compressor.exporters.onnx.onnx_genai``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.adapters.lm_cache import CacheGeometry, cache_argument
from compressor.errors import ExportError
from compressor.exporters.base import ExportContext
from compressor.exporters.onnx.onnx import ort_session


def held_out_rows(ctx: ExportContext, count: int, min_tokens: int) -> list[torch.Tensor]:
    """Up to ``count`` held-out texts of at least ``min_tokens`` kept tokens, as [1, T] ids (unpadded)."""
    rows: list[torch.Tensor] = []
    for b in ctx.data.eval:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            kept = ids[mask.bool()]
            if kept.numel() >= min_tokens:
                rows.append(kept[None].clone())
            if len(rows) == count:
                return rows
    return rows


def stepped_logits(sess: Any, geometry: CacheGeometry, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Every position's logits [T, V] from the cached graph run as a generator runs it: ``ids[:, :prefill]``
    with an empty past, then one token at a time with the present fed back."""
    past = [t.numpy() for t in geometry.empty_past(1)]
    names = geometry.past_names()
    out, seen = [], 0
    for stop in [prefill, *range(prefill + 1, ids.shape[1] + 1)]:
        step = ids[:, seen:stop]
        feed = {
            "input_ids": step,
            "attention_mask": np.ones((1, stop), np.int64),
            "position_ids": np.arange(seen, stop, dtype=np.int64)[None],
            **dict(zip(names, past, strict=True)),
        }
        res = sess.run(None, feed)
        out.append(res[0][0])
        past, seen = res[1:], stop
    return np.concatenate(out, axis=0)


@torch.no_grad()
def torch_stepped_logits(model: nn.Module, ids: torch.Tensor, prefill: int) -> np.ndarray:
    """``stepped_logits`` of the torch model through transformers' own cache."""
    out = model(input_ids=ids[:, :prefill], attention_mask=torch.ones_like(ids[:, :prefill]), use_cache=True)
    logits, cache = [out.logits[0]], out.past_key_values
    name = cache_argument(model)
    for t in range(prefill, ids.shape[1]):
        mask = torch.ones(1, t + 1, dtype=torch.long)
        out = model(input_ids=ids[:, t : t + 1], attention_mask=mask, use_cache=True, **{name: cache})
        logits.append(out.logits[0])
        cache = out.past_key_values
    return torch.cat(logits).float().numpy()


def cached_step_check(
    folder: Path, model: nn.Module, geometry: CacheGeometry, rows: list[torch.Tensor]
) -> dict[str, Any]:
    """Worst cosine / abs error of the cached graph's logits against torch's, both stepped alike
    (a layer that scales its activations per tensor sees the same tensors on both sides)."""
    sess = ort_session(folder / "model.onnx")
    worst_cos, worst_abs = 1.0, 0.0
    for ids in rows:
        prefill = max(1, ids.shape[1] // 2)
        ref = torch_stepped_logits(model, ids, prefill)
        got = stepped_logits(sess, geometry, ids.numpy(), prefill)
        if got.shape != ref.shape or not np.isfinite(got).all():
            raise ExportError(
                f"onnx_genai: the cached graph gave shape {got.shape} or NaN/inf (torch {ref.shape})"
            )
        cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
        worst_cos = min(worst_cos, float(cos.min()))
        worst_abs = max(worst_abs, float(np.abs(got - ref).max()))
    return {"texts": len(rows), "min_cosine": worst_cos, "max_abs_error": worst_abs}


def genai_greedy(og_model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(og_model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt) :]


def torch_greedy(model: nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import GenerationConfig

    config = getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    gc = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=eos, pad_token_id=pad if pad is not None else eos)  # fmt: skip
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)  # type: ignore[operator]
    return [int(t) for t in out[0, len(prompt) :]]


def tokenizer_check(og_model: Any, tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """Whether GenAI's tokenizer encodes ``texts`` as transformers' does (BOS aside, see the module)."""
    import onnxruntime_genai as og

    try:
        og_tok = og.Tokenizer(og_model)
        ours = [[int(t) for t in og_tok.encode(s)] for s in texts]
    except Exception as e:  # GenAI's tokenizer loader refuses some tokenizers (e.g. WordPiece)
        return {"loads": False, "why": str(e).splitlines()[0][:200]}
    theirs = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in texts]
    return {"loads": True, "same_ids": all(a == list(b) for a, b in zip(ours, theirs, strict=True))}


def verify_genai_folder(
    folder: Path, model: nn.Module, ctx: ExportContext, geometry: CacheGeometry, cfg: Any
) -> dict[str, Any]:
    """The cached-step check and the GenAI generation check; ExportError when either fails."""
    import onnxruntime_genai as og

    model.eval()
    quantized = any(type(m).__name__ in ("Int8Linear", "Int4Linear") for m in model.modules())
    rows = held_out_rows(ctx, cfg.verify_prompts, max(cfg.verify_prompt_tokens, 2))
    if not rows:
        raise ExportError(
            "onnx_genai: no held-out text is long enough to verify with; lower verify_prompt_tokens"
        )
    steps = cached_step_check(folder, model, geometry, rows)
    floor = cfg.min_cosine
    if steps["min_cosine"] < floor:
        raise ExportError(
            f"onnx_genai: the cached graph's logits disagree with torch: min cosine {steps['min_cosine']:.5f} "
            f"< {floor} over {steps['texts']} held-out texts stepped token by token"
        )
    try:
        og_model = og.Model(str(folder))
    except Exception as e:
        raise ExportError(f"onnx_genai: ONNX Runtime GenAI could not load the folder: {e}") from e
    prompts = [[int(t) for t in r[0, : cfg.verify_prompt_tokens]] for r in rows]
    runs = []
    for p in prompts:
        got, ref = (
            genai_greedy(og_model, p, cfg.verify_new_tokens),
            torch_greedy(model, p, cfg.verify_new_tokens),
        )
        diverge = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), None)
        runs.append({"prompt_tokens": len(p), "first_divergence": diverge})
    identical = sum(r["first_divergence"] is None for r in runs)
    must = cfg.identical_tokens == "all" or not quantized
    if must and identical < len(runs):
        bad = next(r for r in runs if r["first_divergence"] is not None)
        raise ExportError(
            f"onnx_genai: ONNX Runtime GenAI's greedy tokens differ from torch's at new token "
            f"{bad['first_divergence']} ({identical}/{len(runs)} prompts identical over {cfg.verify_new_tokens} tokens)"
        )
    report: dict[str, Any] = {"cached_steps": steps, "generation": {
        "prompts": len(runs), "new_tokens": cfg.verify_new_tokens, "identical_prompts": identical,
        "first_divergence": [r["first_divergence"] for r in runs], "required_identical": must,
        "runtime": f"onnxruntime-genai {og.__version__}",
    }}  # fmt: skip
    tokenizer = getattr(ctx.adapter, "tokenizer", None)
    if tokenizer is not None:
        texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        report["tokenizer"] = tokenizer_check(og_model, tokenizer, texts)
    return report
