"""`compressed_tensors` exporter: a Hugging Face checkpoint in the compressed-tensors format.

compressed-tensors is the checkpoint format vLLM loads quantized models from (and
transformers, with the ``compressed-tensors`` package installed). A decoder language
model quantized by our ``quantize`` pass (INT8 W8A8, FP8, or INT4 W4A16) is written as a
model folder::

    hf_compressed/
      config.json             # the model's config + quantization_config (below)
      model.safetensors       # int8 weights [N, K], weight_scale [N, 1], input_scale (static)
                              # or int4: weight_packed int32 [N, K/8], weight_scale [N, K/group]
      tokenizer files

with ``quantization_config``: ``quant_method: compressed-tensors``, ``format:
int-quantized``, ``quantization_status: compressed``, one config group per activation
scheme listing its layers by name (``targets``), every other Linear (``lm_head``, layers
left in float by mixed precision) under ``ignore``. The weights are OUR int8 codes and
scales (symmetric per output channel, ``strategy: channel``), not a re-quantization:

- ``dynamic_per_token`` layers: ``input_activations`` int8 symmetric, ``strategy: token``,
  ``dynamic: true`` (what vLLM's W8A8 kernels run);
- ``static_per_tensor`` layers: ``strategy: tensor``, ``dynamic: false``, with the
  calibrated ``input_scale``;
- ``Fp8Linear`` layers (target h100): ``format: float-quantized``, our E4M3 codes as
  ``weight`` (float8_e4m3fn) with ``weight_scale`` [N, 1] (``strategy: channel``) or [1]
  (``tensor``); activations 8-bit float ``strategy: token, dynamic: true`` (vLLM's
  FP8_DYNAMIC), ``tensor, dynamic: true``, or ``tensor, dynamic: false`` with the calibrated
  ``input_scale`` (static FP8). Both use ``max|x| / 448``, so activations round exactly as here;
- an FP8 KV cache (``quantize kv_cache: fp8``, any method): ``kv_cache_scheme`` (8-bit float,
  symmetric, ``strategy: tensor``, static) and each attention module's calibrated
  ``self_attn.k_scale`` / ``self_attn.v_scale`` [1], which vLLM reads for ``kv_cache_dtype:
  fp8``. On reload, compressed-tensors 0.20 applies no KV quantization to transformers 5.24's
  attention (its forward's cache argument is named ``cache``, which compressed-tensors does not
  look for), so the verification applies the file's scales with our emulation and says so;
- ``Int4Linear`` layers (symmetric): ``format: pack-quantized``, weights 4-bit
  ``strategy: group`` with our group size; our unsigned codes ``c`` (zero point 8) are
  its signed ``c - 8``, packed by the compressed-tensors library's own ``pack_to_int32``.

Refused, with what to change, before any work starts where the recipe shows it:
``dynamic_per_tensor`` (ONNX Runtime's asymmetric uint8 scheme; compressed-tensors'
symmetric int8 groups do not describe it), SmoothQuant divisors that stay inside a
layer (``fold_only: true`` folds them into the norms, which the checkpoint carries),
asymmetric INT4 (transformers with compressed-tensors 0.20 could not load packed zero
points back here: a size mismatch), two methods (INT8, FP8, INT4) in one model, and
models that are not decoder LMs.

2:4 sparsity stays in the dense weights' zeros. With ``sparsity_config: true`` (every
quantized layer's weight must then be 2:4: at most two non-zeros in each aligned group of
four input channels) ``quantization_config`` also carries ``sparsity_config: {format:
dense, sparsity_structure: "2:4", targets: [Linear], ignore: <the float Linears>,
global_sparsity}``: ``dense`` = the weights stay as written, zeros in place. It is off by
default: vLLM's CompressedTensors24 scheme ran such INT8 W8A8 layers on CUTLASS 2:4
kernels (sm90) from Dec 2024 until vllm#36799 removed it (Mar 2026), and vLLM since then
refuses checkpoints declaring Sparse24. compressed-tensors 0.20 ignores the entry
(transformers reloads the folder exactly as without it) and no longer has the
sparse-24-bitmask / marlin-24 compressors, so those layouts are not written.

Rounding: our per-token scale is ``max|x| / 127``; compressed-tensors' symmetric int8
uses ``max|x| / 127.5``, so activations round slightly differently there.

Verification is part of the export: the folder is loaded back with transformers
(``AutoModelForCausalLM.from_pretrained``, which decompresses through the
compressed-tensors package and fake-quantizes activations as configured) and its logits
are compared with the torch model's on held-out inputs of several shapes; below
``min_cosine`` the export fails and no folder is left. Serving it with vLLM was not
verified here (vLLM needs a GPU).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.adapters.causal_lm import CausalLMAdapter
from compressor.config import option
from compressor.errors import ExportError, RecipeError
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter
from compressor.exporters.compressed_tensors_layout import (
    check_exportable,
    compressed_state_dict,
    quantization_config,
)
from compressor.kernels.fp8_kv_cache import attach_kv_fp8_, attention_modules
from compressor.planning import FLOAT, LinearPlan, PlanState

log = logging.getLogger(__name__)

FOLDER = "hf_compressed"


@dataclass(frozen=True)
class CompressedTensorsExportConfig:
    verify_batch_sizes: tuple[int, ...] = option((1, 3), help="batch sizes checked after loading the folder")
    verify_lengths: tuple[int, ...] = option((8, 32), help="sequence lengths checked after loading")
    min_cosine: float = option(
        0.99,
        help="fail when any token's logits cosine vs torch is below this (activation rounding differs "
        "slightly: max|x|/127.5 there, /127 here)",
    )
    sparsity_config: bool = option(
        False,
        help="declare 2:4 (format dense) for a model whose quantized weights are all 2:4: for vLLM "
        "versions with the CompressedTensors24 scheme (removed in 2026; later versions refuse it)",
    )

    def validate(self, path: str) -> None:
        if not self.verify_batch_sizes or any(b < 1 for b in self.verify_batch_sizes):
            raise RecipeError(f"{path}.verify_batch_sizes: must be non-empty, each at least 1")
        if not self.verify_lengths or any(t < 1 for t in self.verify_lengths):
            raise RecipeError(f"{path}.verify_lengths: must be non-empty, each at least 1")
        if not 0 < self.min_cosine <= 1:
            raise RecipeError(f"{path}.min_cosine: {self.min_cosine} is not in (0, 1]")


def _refusal(lin: LinearPlan) -> str | None:
    """Why this format cannot express a planned layer (None when it can)."""
    if lin.form == "fp8":
        return None
    if lin.form == "int4":
        if lin.facts.get("activations") == "int8":
            return "int4_activations: int8 (W4A16 is what the format describes); set int4_activations: float"
        return (
            None if lin.facts.get("symmetric", True) else "asymmetric int4 (zero points); set symmetric: true"
        )
    if lin.facts.get("activations") == "dynamic_per_tensor":
        return "activations dynamic_per_tensor; use dynamic_per_token or static_per_tensor"
    if lin.facts.get("explicit_smooth"):
        return "SmoothQuant divisors would stay inside layers without a norm; set fold_only: true"
    return None


@register_exporter
class CompressedTensorsExporter(Exporter):
    name = "compressed_tensors"
    description = (
        "Hugging Face checkpoint in compressed-tensors format (vLLM): INT8 W8A8, FP8 (+ FP8 KV cache "
        "scales) or INT4 W4A16, verified by reloading"
    )
    Config = CompressedTensorsExportConfig

    forms = frozenset({"int8", "fp8", "int4"})
    kv_cache_forms = frozenset({"fp8"})

    def check_plan(self, state: PlanState) -> None:
        where = state.where
        if state.adapter.name in ("hf-encoder", "diffusers"):
            raise RecipeError(
                f"{where} writes decoder language models; model.adapter is {state.adapter.name}"
            )
        quantized = [(n, lin) for n, lin in state.linears.items() if lin.form != FLOAT]
        if not quantized:
            raise RecipeError(
                f"{where} writes quantized checkpoints: add a quantize pass (method int8, fp8 or int4)"
            )
        methods = sorted({lin.form for _, lin in quantized})
        if len(methods) > 1:
            raise RecipeError(
                f"{where} writes one checkpoint format per model; the passes leave {' and '.join(methods)} "
                "layers: quantize with one method"
            )
        for n, lin in quantized:
            refusal = _refusal(lin)
            if refusal:
                raise RecipeError(f"{where} cannot write {lin.by or n}: {refusal}")

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        cfg = self.config
        if not isinstance(ctx.adapter, CausalLMAdapter) or getattr(model, "config", None) is None:
            raise ExportError("compressed_tensors: the model is not a Hugging Face decoder language model")
        problems = check_exportable(model)
        if problems:
            raise ExportError("compressed_tensors cannot write: " + "; ".join(problems))
        try:
            import compressed_tensors  # noqa: F401  (transformers decompresses through it)
        except ImportError as e:
            raise ExportError(
                "compressed_tensors: verifying the checkpoint needs the compressed-tensors package "
                "(pip install compressed-tensors)"
            ) from e
        from safetensors.torch import save_file

        source = max(ctx.data.eval, key=lambda b: next(iter(b.values())).numel())
        cases = ctx.adapter.verification_cases(source, cfg.verify_batch_sizes, cfg.verify_lengths)
        with torch.no_grad():
            model.eval()
            refs = [ctx.adapter.forward(model, c).float() for c in cases]

        final = out_dir / FOLDER
        partial = out_dir / f".partial-{FOLDER}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            tensors = compressed_state_dict(model)
            save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
            config = getattr(model, "config").to_dict()  # noqa: B009  (a transformers PretrainedConfig)
            config["quantization_config"] = qc = quantization_config(model, cfg.sparsity_config)
            config["architectures"] = [type(model).__name__]
            (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            tokenizer = getattr(ctx.adapter, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(partial))
            report = self._verify(partial, cases, refs, ctx)
            if report["min_cosine"] < cfg.min_cosine:
                raise ExportError(
                    f"{FOLDER}: the checkpoint loaded by transformers disagrees with torch: min cosine "
                    f"{report['min_cosine']:.5f} < {cfg.min_cosine} over {report['cases']} held-out cases"
                )
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        report.update(
            {
                "format": qc["format"],
                "quantized_layers": sum(len(g["targets"]) for g in qc["config_groups"].values()),
                "ignored_layers": qc["ignore"],
                "sparsity_structure": qc.get("sparsity_config", {}).get("sparsity_structure"),
            }
        )
        log.info(
            "%s: %d quantized layers, min cosine %.5f",
            FOLDER,
            report["quantized_layers"],
            report["min_cosine"],
        )
        return ExportResult(
            artifacts={"compressed_tensors": FOLDER}, verification={"compressed_tensors": report}
        )

    @staticmethod
    def _verify(
        folder: Path, cases: list[dict[str, torch.Tensor]], refs: list[torch.Tensor], ctx: ExportContext
    ) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists the K/V scales it leaves to vLLM
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        except Exception as e:
            raise ExportError(f"{FOLDER}: transformers could not load the written checkpoint: {e}") from e
        finally:
            hf_logging.set_verbosity(level)
        kv = reload_kv_cache(loaded, folder)
        worst_cos, worst_abs = 1.0, 0.0
        with torch.no_grad():
            for case, ref in zip(cases, refs):
                out = ctx.adapter.forward(loaded, case).float()
                if out.shape != ref.shape or not torch.isfinite(out).all():
                    raise ExportError(
                        f"{FOLDER}: the reloaded model gave shape {tuple(out.shape)} or NaN/inf"
                    )
                keep = case["attention_mask"].bool()  # padded positions carry no meaning
                o, r = out[keep], ref[keep]
                cos = torch.nn.functional.cosine_similarity(o, r, dim=-1)
                worst_cos = min(worst_cos, float(cos.min()))
                worst_abs = max(worst_abs, float((o - r).abs().max()))
        report: dict[str, Any] = {"cases": len(cases), "min_cosine": worst_cos, "max_abs_error": worst_abs}
        if kv is not None:
            report["kv_cache"] = kv
        return report


def reload_kv_cache(loaded: nn.Module, folder: Path) -> dict[str, Any] | None:
    """The FP8 KV cache of a reloaded checkpoint, applied as the checkpoint says (None: it has none).

    compressed-tensors attaches its own KV quantization only to attention modules whose forward
    names a ``past_key_values`` argument; transformers 5.24's is called ``cache``, so there it
    attaches nothing and the scales are left unread. Then the scales read from the written
    file are applied by our emulation, so the comparison still covers what the file says."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    if not config.get("quantization_config", {}).get("kv_cache_scheme"):
        return None
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        layers = sorted(k[: -len(".k_scale")] for k in keys if k.endswith(".k_scale"))
        scales = {n: (f.get_tensor(f"{n}.k_scale"), f.get_tensor(f"{n}.v_scale")) for n in layers}
    attention = [n for n, _ in attention_modules(loaded)]
    if sorted(attention) != layers:
        raise ExportError(
            f"{FOLDER}: kv_cache_scheme is set but the file's K/V scales ({len(layers)} layers) do not match "
            f"the model's {len(attention)} attention layers"
        )
    by = "compressed-tensors"
    if not any(hasattr(loaded.get_submodule(n), "kv_cache") for n in layers):  # what it attaches
        attach_kv_fp8_(loaded, scales)
        by = "compressor (compressed-tensors attached no KV quantization to this transformers' attention)"
    return {"scheme": "fp8 e4m3, one static scale per layer for K and for V", "layers": len(layers),
            "applied_on_reload_by": by}  # fmt: skip
