"""`triton_repository` exporter: a Triton Inference Server model repository for the bundle's ONNX.

Layout (Triton's own, https://docs.nvidia.com/deeplearning/triton-inference-server)::

    triton_repository/
      <model_name>/
        config.pbtxt      # ModelConfig in protobuf text format
        1/model.onnx      # a hard link to (or copy of) the bundle's verified ONNX

The repository serves an ONNX that an ``onnx`` or ``onnx_qdq`` export wrote earlier in
the same recipe, through Triton's ``onnxruntime`` backend: that export must come first
(the export refuses otherwise and no bundle is written). Which one, unless ``onnx_file``
names it: on a GPU target the Q/DQ ONNX (``model.qdq.onnx``, what a GPU deploys: explicit
int8 that ONNX Runtime's CUDA / TensorRT providers run) when the recipe writes one, else
the ONNX Runtime flavour; on the CPU the ONNX Runtime flavour (its fused int8 ops are the
CPU's fast path), else the Q/DQ one. ``config.pbtxt`` is written here
as text, without ``tritonclient``: the inputs and outputs (names, data types, dims with
-1 for dynamic axes) are read from the ONNX graph itself, so the config cannot drift
from the model; the first axis is Triton's batch axis (``max_batch_size`` > 0) and
``dynamic_batching`` lets the server merge requests up to the preferred sizes. Those
sizes are serving batches: ``max_batch_size`` and ``preferred_batch_size`` come from the
batch sizes the recipe benchmarks (``evaluation.bench.batch_sizes``), never from the
exports' verification shapes (odd sizes like 3 exist only to catch shape bugs).

GPU targets get ``instance_group { kind: KIND_GPU }`` and still serve the ONNX through
ONNX Runtime: where the bundle also carries a TensorRT build script, TensorRT plans are
built on the deployment device, so the repository references only the portable ONNX
(a plan could be dropped in beside it as a ``tensorrt`` model once built there).

Verification: the repository's model file has the bundle ONNX's sha256, runs in ONNX
Runtime, and agrees with the torch model on held-out inputs; the config's inputs are
exactly the ONNX graph's inputs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.config import SERVING_BATCH_SIZES, option
from compressor.errors import ExportError, PlanError, RecipeError
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter
from compressor.manifest import sha256_file
from compressor.planning import PlanState
from compressor.targets import Target

log = logging.getLogger(__name__)

FOLDER = "triton_repository"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# onnx.TensorProto data types -> Triton's DataType names (model_config.proto).
_TRITON_TYPES: dict[int, str] = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TritonRepositoryConfig:
    model_name: str = option("model", help="the model's name in the repository (its folder and config name)")
    onnx_file: str = option(
        "",
        help="the bundle's ONNX to serve, written by an `onnx` or `onnx_qdq` export earlier in the recipe; "
        "empty = picked: on a GPU target the onnx_qdq file when the recipe writes one, else the onnx file "
        "(on the cpu target the onnx file first)",
    )
    max_batch_size: int = option(
        0,
        help="largest batch Triton forms; 0 = the largest batch size the recipe benchmarks "
        "(evaluation.bench.batch_sizes)",
    )
    preferred_batch_sizes: tuple[int, ...] = option(
        (), help="dynamic batching's preferred sizes; empty = the recipe's bench batch sizes above 1"
    )
    max_queue_delay_microseconds: int = option(
        100, help="how long the dynamic batcher waits to fill a preferred batch"
    )
    instance_count: int = option(1, help="model instances per device (instance_group.count)")

    def validate(self, path: str) -> None:
        if not _NAME.match(self.model_name):
            raise RecipeError(
                f"{path}.model_name: {self.model_name!r} is not a usable model name "
                "(letters, digits, '_', '.', '-'; not starting with '.' or '-')"
            )
        if self.onnx_file and ("/" in self.onnx_file or not self.onnx_file.endswith(".onnx")):
            raise RecipeError(
                f"{path}.onnx_file: {self.onnx_file!r} must be a plain file name ending in .onnx"
            )
        if self.max_batch_size < 0:
            raise RecipeError(f"{path}.max_batch_size: {self.max_batch_size} must be 0 (derive) or more")
        if any(b < 1 for b in self.preferred_batch_sizes):
            raise RecipeError(f"{path}.preferred_batch_sizes: every size must be at least 1")
        if self.max_batch_size and any(b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise RecipeError(
                f"{path}.preferred_batch_sizes: {list(self.preferred_batch_sizes)} exceeds "
                f"max_batch_size {self.max_batch_size}"
            )
        if self.max_queue_delay_microseconds < 0:
            raise RecipeError(f"{path}.max_queue_delay_microseconds: must not be negative")
        if self.instance_count < 1:
            raise RecipeError(f"{path}.instance_count: must be at least 1")


# ---- what to serve, at what batch sizes ------------------------------------------------------


def pick_onnx(cfg: TritonRepositoryConfig, written: Mapping[str, Sequence[str]], device: str) -> str | None:
    """The ONNX file to serve: ``cfg.onnx_file`` when set, else (on ``device`` "cuda") the first
    Q/DQ file, then the first ONNX Runtime file, or the other way round on the CPU; None if none.
    ``written``: the files the exports before this one write, by artifact kind."""
    if cfg.onnx_file:
        return cfg.onnx_file
    order = ("onnx_qdq", "onnx") if device == "cuda" else ("onnx", "onnx_qdq")
    for fmt in order:
        if written.get(fmt):
            return written[fmt][0]
    return None


def check_served(cfg: TritonRepositoryConfig, state: PlanState) -> None:
    """Refuse a repository that serves an ONNX no export before it writes."""
    written = state.written()
    served = pick_onnx(cfg, written, state.target.device)
    if served is None:
        raise RecipeError(
            f"{state.where} serves model.onnx, which no `onnx` export before it writes (nor a Q/DQ ONNX "
            "from `onnx_qdq`); add `- format: onnx` (or onnx_qdq) earlier in exports"
        )
    if served not in [*written.get("onnx", ()), *written.get("onnx_qdq", ())]:
        raise RecipeError(
            f"{state.where} serves {served}, which no `onnx` export before it writes; add `- format: onnx` "
            "earlier in exports"
        )


def batching(cfg: TritonRepositoryConfig, serving_sizes: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """(max_batch_size, preferred_batch_sizes) from the config, else from the serving batch sizes
    (the recipe's bench sizes: ``ExportContext.batch_sizes``; not the exports' verification
    shapes, odd sizes like 3 that exist only to catch shape bugs)."""
    sizes = tuple(sorted(set(serving_sizes))) or SERVING_BATCH_SIZES
    max_batch = cfg.max_batch_size or max(sizes)
    preferred = cfg.preferred_batch_sizes or tuple(b for b in sizes if 1 < b <= max_batch)
    return max_batch, tuple(sorted(set(preferred)))


# ---- config.pbtxt -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's TYPE_*
    dims: tuple[int, ...]  # without the batch axis; -1 = dynamic


def onnx_io(model: Any, batched: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded) and outputs as Triton tensors.

    With ``batched`` the first axis is Triton's batch axis and must be dynamic in the graph."""
    inits = {t.name for t in model.graph.initializer}

    def spec(v: Any, kind: str) -> TensorSpec:
        tt = v.type.tensor_type
        if tt.elem_type not in _TRITON_TYPES:
            raise ExportError(f"ONNX {kind} {v.name!r}: element type {tt.elem_type} has no Triton data type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if batched:
            if not dims or dims[0] != -1:
                raise ExportError(
                    f"ONNX {kind} {v.name!r} has shape {dims}: its first axis is not a dynamic batch axis, "
                    "so Triton cannot batch it; export the model with a dynamic batch axis"
                )
            dims = dims[1:]
        return TensorSpec(v.name, _TRITON_TYPES[tt.elem_type], tuple(dims))

    inputs = [spec(v, "input") for v in model.graph.input if v.name not in inits]
    outputs = [spec(v, "output") for v in model.graph.output]
    return inputs, outputs


def render_config_pbtxt(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_microseconds: int,
    instance_count: int,
    instance_kind: str,
) -> str:
    """Triton's ``ModelConfig`` in protobuf text format, for the onnxruntime backend."""

    def tensors(key: str, specs: Sequence[TensorSpec]) -> list[str]:
        lines = [f"{key} ["]
        for i, t in enumerate(specs):
            comma = "," if i < len(specs) - 1 else ""
            lines += ["  {", f'    name: "{t.name}"', f"    data_type: {t.data_type}"]
            if t.dims:
                lines += [f"    dims: [ {', '.join(str(d) for d in t.dims)} ]"]
            else:  # one value per batch row: Triton's idiom for a [B] tensor
                lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
            lines += [f"  }}{comma}"]
        return [*lines, "]"]

    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        'default_model_filename: "model.onnx"',
        f"max_batch_size: {max_batch_size}",
        *tensors("input", inputs),
        *tensors("output", outputs),
    ]
    if max_batch_size > 0:
        lines += ["dynamic_batching {"]
        if preferred_batch_sizes:
            lines += [f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred_batch_sizes)} ]"]
        lines += [f"  max_queue_delay_microseconds: {max_queue_delay_microseconds}", "}"]
    lines += [
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


@register_exporter
class TritonRepositoryExporter(Exporter):
    name = "triton_repository"
    description = (
        "Triton Inference Server model repository (onnxruntime backend, dynamic batching) for the "
        "bundle's ONNX (the Q/DQ one on GPU targets); needs an `onnx` or `onnx_qdq` export before it"
    )
    Config = TritonRepositoryConfig

    consumes = ("onnx", "onnx_qdq")

    def check_plan(self, state: PlanState) -> None:
        self.check(state.target)
        check_served(self.config, state)

    def check(self, target: Target) -> None:
        if "onnxruntime" not in target.engines:
            raise PlanError(
                f"triton_repository serves ONNX through Triton's onnxruntime backend, which target "
                f"{target.name!r} does not run (engines: {', '.join(target.engines)})"
            )

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        import onnx

        cfg = self.config
        written: dict[str, list[str]] = {k: [f] for k, f in ctx.written.items()}
        if not written:  # called from Python, outside a compile: what the bundle folder holds
            from compressor.exporters.onnx.onnx_qdq import QDQ_FILE

            written = {
                "onnx": ["model.onnx"] if (out_dir / "model.onnx").is_file() else [],
                "onnx_qdq": [QDQ_FILE] if (out_dir / QDQ_FILE).is_file() else [],
            }
        served = pick_onnx(cfg, written, ctx.target.device)
        onnx_path = out_dir / (served or cfg.onnx_file or "model.onnx")
        if served is None or not onnx_path.is_file():
            raise RecipeError(
                f"exports: triton_repository serves {onnx_path.name!r}, which this recipe did not write: "
                "add `- format: onnx` before `- format: triton_repository` in exports"
            )
        max_batch, preferred = batching(cfg, ctx.batch_sizes)
        proto = onnx.load(str(onnx_path), load_external_data=False)
        inputs, outputs = onnx_io(proto, batched=max_batch > 0)
        kind = "KIND_GPU" if ctx.target.device == "cuda" else "KIND_CPU"
        text = render_config_pbtxt(
            cfg.model_name,
            inputs,
            outputs,
            max_batch,
            preferred,
            cfg.max_queue_delay_microseconds,
            cfg.instance_count,
            kind,
        )
        model_dir = out_dir / FOLDER / cfg.model_name
        version = model_dir / "1"
        if model_dir.exists():
            raise RecipeError(
                f"exports: two triton_repository exports name the model {cfg.model_name!r}; "
                "give each its own model_name"
            )
        try:
            version.mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
            _link_or_copy(onnx_path, version / "model.onnx")
            for rel in _external_data_files(proto):  # large models keep weights beside the .onnx
                _link_or_copy(out_dir / rel, version / rel)
            report = self._verify(version / "model.onnx", onnx_path, model, ctx, inputs, max_batch)
        except BaseException:  # no half-written model folder (nor an empty repository) stays behind
            shutil.rmtree(model_dir, ignore_errors=True)
            if not any((out_dir / FOLDER).iterdir()):
                (out_dir / FOLDER).rmdir()
            raise
        report.update(
            {
                "model_name": cfg.model_name,
                "serves": onnx_path.name,
                "max_batch_size": max_batch,
                "preferred_batch_sizes": list(preferred),
                "instance_kind": kind,
            }
        )
        log.info("wrote %s (max_batch_size %d, %s)", model_dir, max_batch, kind)
        return ExportResult(
            artifacts={"triton_repository": FOLDER}, verification={"triton_repository": report}
        )

    def _verify(
        self,
        served: Path,
        bundle_onnx: Path,
        model: nn.Module,
        ctx: ExportContext,
        inputs: Sequence[TensorSpec],
        max_batch: int,
    ) -> dict[str, Any]:
        from compressor.exporters.onnx.onnx import ort_session

        if sha256_file(served) != sha256_file(bundle_onnx):
            raise ExportError(f"{served}: differs from the bundle's {bundle_onnx.name}")
        sess = ort_session(served)
        names = [i.name for i in sess.get_inputs()]
        if names != [t.name for t in inputs]:
            raise ExportError(f"config.pbtxt inputs {[t.name for t in inputs]} != ONNX Runtime's {names}")
        source = max(ctx.data.eval, key=lambda b: next(iter(b.values())).numel())
        rows = next(iter(source.values())).shape[0]
        sizes = sorted({1, min(rows, max_batch or rows)})
        cases = ctx.adapter.verification_cases(source, sizes, (16,))
        worst = 1.0
        with torch.no_grad():
            model.eval()
            for case in cases:
                ref = ctx.adapter.forward(model, case).float().numpy()
                out = sess.run(None, {k: v.numpy() for k, v in case.items() if k in names})[0]
                if out.shape != ref.shape or not np.isfinite(out).all():
                    raise ExportError(f"{served}: output {out.shape} is not finite or != torch {ref.shape}")
                cos = (out * ref).sum(-1) / (
                    np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12
                )
                worst = min(worst, float(cos.min()))
        return {"cases": len(cases), "min_cosine": worst, "model_sha256": sha256_file(served)}


def _external_data_files(proto: Any) -> list[str]:
    """Files an ONNX model keeps its tensors in (``location`` of external initializers)."""
    files: set[str] = set()
    for t in proto.graph.initializer:
        if t.data_location == 1:  # TensorProto.EXTERNAL
            files.update(e.value for e in t.external_data if e.key == "location")
    return sorted(files)
