"""`compressed_tensors` exporter: a Hugging Face checkpoint in the compressed-tensors format.

compressed-tensors is the checkpoint format vLLM loads quantized models from (and
transformers, with the ``compressed-tensors`` package installed). A decoder language
model quantized by our ``quantize`` pass (INT8 W8A8, or INT4 W4A16) is written as a
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
- ``Int4Linear`` layers (symmetric): ``format: pack-quantized``, weights 4-bit
  ``strategy: group`` with our group size; our unsigned codes ``c`` (zero point 8) are
  its signed ``c - 8``, packed by the compressed-tensors library's own ``pack_to_int32``.

Refused, with what to change, before any work starts where the recipe shows it:
``dynamic_per_tensor`` (ONNX Runtime's asymmetric uint8 scheme; compressed-tensors'
symmetric int8 groups do not describe it), SmoothQuant divisors that stay inside a
layer (``fold_only: true`` folds them into the norms, which the checkpoint carries),
asymmetric INT4 (transformers with compressed-tensors 0.20 could not load packed zero
points back here: a size mismatch), FP8 layers (not written yet), INT8 and INT4 in one
model, and models that are not decoder LMs.

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
from compressor.kernels.int4_format import unpack_w4a16
from compressor.kernels.int4_linear import Int4Linear
from compressor.kernels.int8_linear import Int8Linear

log = logging.getLogger(__name__)

FOLDER = "hf_compressed"
INT8_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
INPUT_ACTIVATIONS = {
    "dynamic_per_token": {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "token",
        "dynamic": True,
    },
    "static_per_tensor": {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "tensor",
        "dynamic": False,
    },
}
_INT8_KEYS = (
    "weight",
    "weight_scale",
    "bias",
    "smooth",
    "weight_mask",
    "input_scale",
    "qweight_t",
    "inv_smooth",
)
_INT4_KEYS = ("packed", "scales", "zeros", "bias", "onnx_b", "onnx_scales", "onnx_zero_points")


def _is_int4(m: nn.Module) -> bool:
    return type(m).__name__ == "Int4Linear"


def _int4_symmetric(m: Int4Linear) -> bool:
    return bool((m.zeros == 8).all())


def _int4_weights(m: Int4Linear) -> dict[str, Any]:
    return {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": m.group_size,
        "dynamic": False,
    }


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


def check_exportable(model: nn.Module) -> list[str]:
    """Why ``model``'s layers cannot be written as compressed-tensors INT8 (empty: they can)."""
    problems = []
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            if m.act_scheme not in INPUT_ACTIVATIONS:
                problems.append(
                    f"{name}: activations {m.act_scheme} (use activations: dynamic_per_token or static_per_tensor)"
                )
            if m.smooth is not None:
                problems.append(
                    f"{name}: a SmoothQuant divisor inside the layer (set fold_only: true on the quantize pass)"
                )
        elif _is_int4(m) and m.smooth is not None:
            problems.append(
                f"{name}: an AWQ input divisor inside the layer (set awq_explicit_scales: false on the quantize pass)"
            )
        elif _is_int4(m) and not _int4_symmetric(m):
            problems.append(
                f"{name}: asymmetric int4 (zero points); set symmetric: true on the quantize pass (transformers "
                "with compressed-tensors 0.20 could not load packed zero points back: size mismatch)"
            )
        elif type(m).__name__ == "Fp8Linear":
            problems.append(f"{name}: Fp8Linear (INT8 W8A8 and INT4 W4A16 layers are written so far)")
    kinds = {type(m) for m in model.modules() if isinstance(m, Int8Linear) or _is_int4(m)}
    if not kinds:
        problems.append("no Int8Linear or Int4Linear layer: run the quantize pass (int8 or int4) first")
    elif len(kinds) > 1:
        problems.append("INT8 and INT4 layers in one model (one checkpoint format per model is written)")
    return problems


def quantization_config(model: nn.Module, sparse_24: bool = False) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for ``model``'s quantized layers
    (with the 2:4 ``sparsity_config`` when ``sparse_24``; ExportError if a weight is not 2:4)."""
    by_scheme: dict[str, list[str]] = {}
    schemes: dict[str, dict[str, Any]] = {}
    ignore = []
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            key = f"int8 {m.act_scheme}"
            schemes[key] = {
                "weights": dict(INT8_WEIGHTS),
                "input_activations": dict(INPUT_ACTIVATIONS[m.act_scheme]),
            }
        elif _is_int4(m):
            key = f"int4 {_int4_weights(m)}"
            schemes[key] = {"weights": _int4_weights(m)}
        elif isinstance(m, nn.Linear):
            ignore.append(name)
            continue
        else:
            continue
        by_scheme.setdefault(key, []).append(name)
    groups = {
        f"group_{i}": {"targets": names, **schemes[key]}
        for i, (key, names) in enumerate(sorted(by_scheme.items()))
    }
    int4 = any(_is_int4(m) for m in model.modules())
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if int4 else "int-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
    }
    if sparse_24:
        sparse = sparsity_config(model, ignore)
        if sparse is None:
            raise ExportError(
                "compressed_tensors.sparsity_config: true, but not every quantized weight is 2:4; run "
                "sparsify (pattern 2:4) on the same layers before quantize, or set it to false"
            )
        qc["sparsity_config"] = sparse
    return qc


def sparsity_config(model: nn.Module, ignore: list[str]) -> dict[str, Any] | None:
    """compressed-tensors' 2:4 ``sparsity_config`` (format ``dense``: the weights as written) when
    every quantized layer's weight is 2:4, else None (a partly 2:4 model is written dense)."""
    from compressor.passes.sparsity.sparsify import is_24_sparse

    weights: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, Int8Linear):
            weights.append(m.qweight())
        elif _is_int4(m):
            weights.append(m.dequantized_weight())  # type: ignore[operator]  # symmetric: code 8 -> exactly 0
    if not weights or not all(is_24_sparse(w) for w in weights):
        return None
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {
        "format": "dense",
        "sparsity_structure": "2:4",
        "targets": ["Linear"],
        "ignore": list(ignore),
        "global_sparsity": round(zeros / sum(w.numel() for w in weights), 4),
    }


def compressed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: Int8Linear layers as int8 ``weight`` + ``weight_scale`` [N, 1]
    (+ ``input_scale`` [1] for static layers, + ``bias``), everything else as in the model."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out: dict[str, torch.Tensor] = {}
    int8_names, int4_names = set(), set()
    for name, m in model.named_modules():
        if _is_int4(m):
            # symmetric: our unsigned codes c (zero point 8) are compressed-tensors' signed c - 8,
            # rows = output channels, packed 8 a word by the library
            int4_names.add(name)
            codes = (unpack_w4a16(m.packed).t().contiguous() - 8).to(torch.int8)  # [N, K]
            out[f"{name}.weight_packed"] = pack_to_int32(codes, 4)
            out[f"{name}.weight_scale"] = m.scales.detach().float().t().contiguous()  # [N, K / group]
            out[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias.detach().float()
            continue
        if not isinstance(m, Int8Linear):
            continue
        int8_names.add(name)
        out[f"{name}.weight"] = m.qweight()
        out[f"{name}.weight_scale"] = m.weight_scale.detach().float().reshape(-1, 1)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().float()
        if m.act_scheme == "static_per_tensor" and m.input_scale is not None:
            out[f"{name}.input_scale"] = m.input_scale.detach().float().reshape(1)
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if (owner in int8_names and leaf in _INT8_KEYS) or (owner in int4_names and leaf in _INT4_KEYS):
            continue
        if leaf == "weight_mask":
            continue
        out[key] = t.detach()
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in out:
        del out["lm_head.weight"]  # tied to the input embeddings; transformers re-ties on load
    return {k: v.contiguous().clone() for k, v in out.items()}


@register_exporter
class CompressedTensorsExporter(Exporter):
    name = "compressed_tensors"
    description = (
        "Hugging Face checkpoint in compressed-tensors format (vLLM), INT8 W8A8, verified by reloading"
    )
    Config = CompressedTensorsExportConfig

    def check_recipe(self, recipe: Any, index: int) -> None:
        where = f"exports[{index}]: compressed_tensors"
        if recipe.model.adapter in ("hf-encoder", "diffusers"):
            raise RecipeError(
                f"{where} writes decoder language models; model.adapter is {recipe.model.adapter}"
            )
        quantizes = [p for p in recipe.passes if p.name == "quantize"]
        if not quantizes:
            raise RecipeError(
                f"{where} writes quantized checkpoints: add a quantize pass (method int8 or int4)"
            )
        for i, p in enumerate(recipe.passes):
            if p.name != "quantize":
                continue
            c = p.config
            at = f"{where} cannot write passes[{i}] (quantize)"
            if c.method == "fp8":
                raise RecipeError(f"{at}: method fp8 (int8 W8A8 and int4 W4A16 are written so far)")
            if c.method == "int4":
                if not c.symmetric:
                    raise RecipeError(f"{at}: asymmetric int4 (zero points); set symmetric: true")
                continue
            if c.activations == "dynamic_per_tensor":
                raise RecipeError(
                    f"{at}: activations dynamic_per_tensor; use dynamic_per_token or static_per_tensor"
                )
            if c.smoothquant and not c.fold_only:
                raise RecipeError(
                    f"{at}: SmoothQuant divisors would stay inside layers without a norm; set fold_only: true"
                )

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

        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        except Exception as e:
            raise ExportError(f"{FOLDER}: transformers could not load the written checkpoint: {e}") from e
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
        return {"cases": len(cases), "min_cosine": worst_cos, "max_abs_error": worst_abs}
