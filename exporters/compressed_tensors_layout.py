"""The compressed-tensors layout of our quantized layers: ``quantization_config``,
``sparsity_config``, ``kv_cache_scheme`` and the state dict of OUR int8 / fp8 / int4 codes and
scales, as the ``compressed_tensors`` exporter writes them (the format is described there)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.errors import ExportError
from compressor.kernels.fp8_kv_cache import has_fp8_kv_cache
from compressor.kernels.fp8_linear import Fp8Linear
from compressor.kernels.int4_format import unpack_w4a16
from compressor.kernels.int4_linear import Int4Linear
from compressor.kernels.int8_linear import Int8Linear
from compressor.kernels.sparse24_format import is_24_sparse

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
KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
"""``kv_cache_scheme``: each attention layer's keys and values in E4M3 with one static scale each."""
_FP8_KEYS = ("weight", "weight_scale", "bias", "weight_mask", "input_scale")
FP8_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
FP8_INPUT_ACTIVATIONS = {
    "dynamic_per_token": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True},
    "dynamic_per_tensor": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": True},
    "static_per_tensor": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False},
}  # fmt: skip
_INT4_KEYS = ("packed", "scales", "zeros", "bias", "onnx_b", "onnx_scales", "onnx_zero_points")


def _is_int4(m: nn.Module) -> bool:
    return type(m).__name__ == "Int4Linear"


def _fp8_scheme(m: Fp8Linear) -> dict[str, Any]:
    strategy = "channel" if m.granularity == "per_channel" else "tensor"
    return {
        "weights": {**FP8_WEIGHTS, "strategy": strategy},
        "input_activations": dict(FP8_INPUT_ACTIVATIONS[m.act_scheme]),
    }


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


def check_exportable(model: nn.Module) -> list[str]:
    """Why ``model``'s layers cannot be written as compressed-tensors (empty: they can)."""
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
    kinds = {
        type(m).__name__ for m in model.modules() if isinstance(m, (Int8Linear, Fp8Linear)) or _is_int4(m)
    }
    if not kinds:
        problems.append("no Int8Linear, Fp8Linear or Int4Linear layer: run the quantize pass first")
    elif len(kinds) > 1:
        problems.append(
            f"{' and '.join(sorted(kinds))} layers in one model (one checkpoint format per model is written)"
        )
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
        elif isinstance(m, Fp8Linear):
            key = f"fp8 {m.granularity} {m.act_scheme}"
            schemes[key] = _fp8_scheme(m)
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
    fp8 = any(isinstance(m, Fp8Linear) for m in model.modules())
    qc: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if int4 else "float-quantized" if fp8 else "int-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
    }
    if has_fp8_kv_cache(model):
        qc["kv_cache_scheme"] = dict(KV_CACHE_SCHEME)
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
    weights: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, Int8Linear):
            weights.append(m.qweight())
        elif isinstance(m, Fp8Linear):
            weights.append(m.fp8_weight().float())
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
    (+ ``input_scale`` [1] for static layers, + ``bias``), Fp8Linear alike in E4M3, Int4Linear
    packed; everything else as in the model (with an FP8 KV cache: each attention module's
    ``k_scale`` / ``v_scale`` [1])."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out: dict[str, torch.Tensor] = {}
    int8_names, int4_names, fp8_names = set(), set(), set()
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            # E4M3 codes [N, K]; weight_scale [N, 1] per channel or [1] per tensor; static: input_scale [1]
            fp8_names.add(name)
            out[f"{name}.weight"] = m.fp8_weight()
            ws = m.weight_scale.detach().float()
            out[f"{name}.weight_scale"] = (
                ws.reshape(-1, 1) if m.granularity == "per_channel" else ws[:1].reshape(1)
            )
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias.detach().float()
            if m.act_scheme == "static_per_tensor" and m.input_scale is not None:
                out[f"{name}.input_scale"] = m.input_scale.detach().float().reshape(1)
            continue
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
        if (
            (owner in int8_names and leaf in _INT8_KEYS)
            or (owner in int4_names and leaf in _INT4_KEYS)
            or (owner in fp8_names and leaf in _FP8_KEYS)
        ):
            continue
        if leaf == "weight_mask":
            continue
        out[key] = t.detach()
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in out:
        del out["lm_head.weight"]  # tied to the input embeddings; transformers re-ties on load
    return {k: v.contiguous().clone() for k, v in out.items()}
