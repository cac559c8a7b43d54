"""The compressed-tensors layout of our quantized layers: ``quantization_config``,
``sparsity_config`` and the state dict of OUR int8 / int4 codes and scales, as the
``compressed_tensors`` exporter writes them (the format is described there)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.errors import ExportError
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
