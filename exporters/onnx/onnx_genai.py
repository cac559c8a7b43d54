"""`onnx_genai` exporter: a decoder LM with its KV cache, as a folder ONNX Runtime GenAI generates from.

The folder (``genai/`` by default)::

    genai/
      model.onnx          # input_ids, attention_mask, position_ids, past_key_values.{i}.key/value
                          #   -> logits, present.{i}.key/value (compressor.adapters.lm_cache)
      genai_config.json   # the model's geometry, the graph's input / output names, greedy search
      tokenizer.json, tokenizer_config.json, ...   # the model's own tokenizer files

``onnxruntime_genai.Model(folder)`` loads it as it is; ``og.Generator`` feeds the graph an empty
past for the prompt and each new token with the present it returned (``past_present_share_buffer:
false``: the graph concatenates). The layers are exported as the ``onnx`` export writes them:
``Int8Linear`` as ``DynamicQuantizeLinear`` + ``MatMulInteger`` (fused by ONNX Runtime), our
``Int4Linear`` as ``MatMulNBits``, with OUR codes and scales.

Verification is part of the export, before the folder appears:

- **cached steps** (plain ONNX Runtime): held-out texts run through the graph the way a
  generator runs it (the first half as one prefill, then one token at a time with the present
  fed back); every position's logits are compared with the torch model's stepped the same way
  through transformers' own cache (so a layer that scales activations per tensor sees the same
  tensors on both sides), and a cosine below ``min_cosine`` fails the export;
- **generation** (ONNX Runtime GenAI): ``verify_prompts`` held-out prompts, ``verify_new_tokens``
  greedy tokens each (end of text suppressed until then, ``min_length``), against
  ``transformers``' ``generate`` on the torch model (for a quantized model, our torch emulation
  of its layers). A float graph must give the same tokens at every step; a quantized graph's
  agreement is reported (``identical_prompts``, ``first_divergence``) and must be identical too
  when ``identical_tokens: all``;
- the tokenizer: whether GenAI's tokenizer encodes the prompts' text to the same ids as
  transformers' (reported; GenAI's tokenizer does not apply a post-processor's BOS, so a
  tokenizer that adds one differs by it).

Refused: FP8 layers (ONNX Runtime has no FP8 GEMM here), models that are not decoder LMs, and
model types GenAI's decoder does not know (``GENAI_TYPES``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from compressor.adapters.causal_lm import CausalLMAdapter
from compressor.adapters.lm_cache import CacheGeometry, cache_export_spec
from compressor.config import option
from compressor.errors import ExportError, RecipeError
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter
from compressor.exporters.onnx.genai_verify import verify_genai_folder
from compressor.exporters.onnx.onnx import export_onnx
from compressor.exporters.onnx.ort_int8 import INT8_WEIGHT_CHOICES
from compressor.planning import PlanState

log = logging.getLogger(__name__)

GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "granite", "olmo"})
"""``config.model_type`` values written as GenAI's ``model.type`` (its standard decoder)."""


@dataclass(frozen=True)
class OnnxGenaiExportConfig:
    folder: str = option("genai", help="folder name inside the bundle")
    opset: int = option(17, help="ONNX opset")
    int8_weights: str = option(
        "auto", help="MatMulInteger weight encoding, as in the onnx export: int8, uint8 or auto"
    )
    verify_prompts: int = option(3, help="held-out prompts generated from in ONNX Runtime GenAI", ge=1, le=64)
    verify_prompt_tokens: int = option(12, help="tokens of each held-out text used as its prompt", ge=1)
    verify_new_tokens: int = option(64, help="greedy tokens generated per prompt and compared", ge=1, le=4096)
    identical_tokens: Literal["float", "all"] = option(
        "float",
        help="which graphs must generate exactly torch's tokens: float (quantized graphs: reported, their "
        "cached-step logits checked) or all",
    )
    min_cosine: float = option(
        0.999,
        help="fail when a cached step's logits cosine vs torch's (stepped alike, through transformers' cache) "
        "is below this",
    )

    def validate(self, path: str) -> None:
        if self.opset < 17:
            raise RecipeError(f"{path}.opset: {self.opset} is too old; 17 or later is needed")
        if "/" in self.folder or self.folder in ("", ".", ".."):
            raise RecipeError(f"{path}.folder: {self.folder!r} must be a plain folder name")
        if self.int8_weights not in INT8_WEIGHT_CHOICES:
            raise RecipeError(
                f"{path}.int8_weights: {self.int8_weights!r} is not one of {', '.join(INT8_WEIGHT_CHOICES)}"
            )
        if not 0 < self.min_cosine <= 1:
            raise RecipeError(f"{path}.min_cosine: {self.min_cosine} is not in (0, 1]")


def special_ids(config: object, tokenizer: Any) -> dict[str, Any]:
    """bos / eos / pad token ids from the model's config, else its tokenizer's (pad: eos when
    neither has one); ids neither has, or outside the vocabulary, are left out (GenAI wants
    numbers in range, not null)."""
    vocab = int(getattr(config, "vocab_size"))  # noqa: B009  (a transformers config)
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if value is None:
            value = getattr(tokenizer, key, None)
        if isinstance(value, int) and 0 <= value < vocab:
            out[key] = value
    if "pad_token_id" not in out and "eos_token_id" in out:
        out["pad_token_id"] = out["eos_token_id"]
    return out


def genai_config(
    config: object, geometry: CacheGeometry, max_length: int, tokenizer: Any
) -> dict[str, object]:
    """``genai_config.json`` for the graph ``cache_export_spec`` traces."""
    return {
        "model": {
            **special_ids(config, tokenizer),
            "context_length": max_length,
            "vocab_size": int(getattr(config, "vocab_size")),  # noqa: B009  (a transformers config)
            "type": getattr(config, "model_type"),  # noqa: B009
            "decoder": {
                "filename": "model.onnx",
                "head_size": geometry.head_dim,
                "hidden_size": geometry.hidden_size,
                "num_attention_heads": geometry.attention_heads,
                "num_hidden_layers": geometry.layers,
                "num_key_value_heads": geometry.kv_heads,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": max_length,
            "min_length": 0, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
        },
    }  # fmt: skip


def write_genai_folder(
    model: nn.Module, adapter: CausalLMAdapter, folder: Path, opset: int = 17, int8_weights: str = "auto"
) -> dict[str, object]:
    """``model.onnx`` with the KV cache, ``genai_config.json`` and the tokenizer files into the
    existing ``folder`` (unverified: the export verifies it); returns the int8 weight encoding."""
    config = getattr(model, "config")  # noqa: B009  (a transformers model)
    geometry = CacheGeometry.of(config)
    spec = cache_export_spec(model, geometry, int(config.vocab_size))
    encoding = export_onnx(model, spec, folder / "model.onnx", opset, int8_weights)
    max_length = adapter.max_positions or int(getattr(config, "max_position_embeddings", 2048))
    text = json.dumps(genai_config(config, geometry, max_length, adapter.tokenizer), indent=2) + "\n"
    (folder / "genai_config.json").write_text(text)
    if adapter.tokenizer is not None:
        adapter.tokenizer.save_pretrained(str(folder))
    return encoding


@register_exporter
class OnnxGenaiExporter(Exporter):
    name = "onnx_genai"
    description = (
        "decoder LM with its KV cache as ONNX + genai_config.json for ONNX Runtime GenAI (int8, int4 "
        "MatMulNBits), verified by generating in GenAI"
    )
    Config = OnnxGenaiExportConfig
    forms = frozenset({"int8", "int4"})

    def check_plan(self, state: PlanState) -> None:
        if state.adapter.name != "hf-causal-lm":
            raise RecipeError(
                f"{state.where} writes decoder language models; model.adapter is {state.adapter.name}"
            )
        kind = getattr(getattr(state.model, "config", None), "model_type", None)
        if kind not in GENAI_TYPES:
            raise RecipeError(
                f"{state.where}: model type {kind!r} is not one ONNX Runtime GenAI's decoder runs "
                f"({', '.join(sorted(GENAI_TYPES))}); use the onnx export"
            )

    def output_files(self) -> dict[str, str]:
        return {self.name: self.config.folder}

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        cfg = self.config
        config = getattr(model, "config", None)
        if not isinstance(ctx.adapter, CausalLMAdapter) or config is None:
            raise ExportError("onnx_genai: the model is not a Hugging Face decoder language model")
        fp8 = [n for n, m in model.named_modules() if type(m).__name__ == "Fp8Linear"]
        if fp8:
            raise ExportError(f"onnx_genai: {fp8[0]} is an FP8 layer; ONNX Runtime has no FP8 GEMM here")
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError as e:
            raise ExportError(
                "onnx_genai: verifying the folder needs ONNX Runtime GenAI (pip install onnxruntime-genai)"
            ) from e
        geometry = CacheGeometry.of(config)
        final, partial = out_dir / cfg.folder, out_dir / f".partial-{cfg.folder}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            log.info("exporting %s (with its KV cache)", final)
            encoding = write_genai_folder(model, ctx.adapter, partial, cfg.opset, cfg.int8_weights)
            report = verify_genai_folder(partial, model, ctx, geometry, cfg)
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        report.update(encoding)
        return ExportResult(artifacts={"onnx_genai": cfg.folder}, verification={"onnx_genai": report})
