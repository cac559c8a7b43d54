"""all-MiniLM-L6-v2 on the CPU: how fast is each pruned shape once it is int8, in ONNX Runtime?

Structured pruning trades fidelity for speed, and how much speed a shape buys depends on
the machine (an int8 GEMM is several times faster than fp32 with AVX-512 VNNI, barely
faster without it). This scan answers "which depth x FFN width reaches N x ORT fp32 here"
before any distillation is spent on a shape: every shape is pruned from the packaged model
by the ``prune`` pass (activation importance on the calibration texts, no recovery), made
int8 by the ``quantize`` pass as ``minilm-cpu-pruned-int8`` does it (SmoothQuant, dynamic
per-tensor activations; no float layers kept, so the figures are the all-int8 case), exported
by our ``onnx`` exporter (verified in ORT against torch) and timed side by side with ORT fp32
of transformers' own export (engines rotated, ``compressor.bench.time_side_by_side``), batch
x 128 held-out sentences padded to 128 tokens. The one-shot fidelity of each shape (no
distillation) is recorded too: it says how much a shape loses before recovery.

    python benchmarks/pruned_shapes_cpu.py [--shapes 6x1536,4x768] [--batch 32] [--threads 2]

Writes ``benchmarks/results/pruned_shapes_cpu.{json,md}`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SHAPES = "6x1536,6x768,5x1536,5x1152,5x768,4x1536,4x1152,4x768,3x1536"
log = logging.getLogger("pruned_shapes_cpu")


def cpu_flags() -> list[str]:
    """The int8-relevant x86 feature flags of this CPU (what decides ORT's int8 GEMM speed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})


def main() -> int:
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.bench import time_onnx_against_fp32
    from compressor.config import from_dict
    from compressor.exporters.base import ExportContext
    from compressor.exporters.onnx import OnnxExportConfig, OnnxExporter
    from compressor.passes import PASSES
    from compressor.pipeline import PassContext, Pipeline
    from compressor.recipe import DataSpec
    from compressor.targets import get_target

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shapes", default=DEFAULT_SHAPES, help="LAYERSxFFN, comma-separated (6x1536 = unpruned)"
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("compressor").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    adapter = HFEncoderAdapter()
    teacher = adapter.load("default").eval()
    spec = DataSpec(calibration_samples=128, train_samples=0, eval_samples=256, batch_size=32)
    data = adapter.make_data(spec, seed=0)
    target = get_target("cpu")
    quantize = {"method": "int8", "targets": ["encoder.*"], "smoothquant": True, "alpha_grid": [0.6, 0.8]}
    work = Path(tempfile.mkdtemp(prefix="pruned-shapes-"))
    rows: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {}
    for layers, ffn in shapes:
        key = f"{layers}x{ffn}"
        entries: list[dict[str, Any]] = []
        if (layers, ffn) != (6, 1536):
            entries.append({"pass": "prune", "layers": layers, "ffn": ffn, "ffn_multiple_of": 64})
        entries.append({"pass": "quantize", **quantize})
        built = [
            PASSES[e["pass"]](
                from_dict(PASSES[e["pass"]].Config, {k: v for k, v in e.items() if k != "pass"}, key)
            )
            for e in entries
        ]
        pipe = Pipeline(built, instruments=[])
        pipe.check(teacher, target, adapter)
        ctx = PassContext(target=target, adapter=adapter, teacher=teacher, data=data, seed=0, work_dir=work)
        model = pipe.run(copy.deepcopy(teacher), ctx)
        fid = adapter.metrics(model, teacher, data.eval)
        out_dir = work / key
        out_dir.mkdir()
        ectx = ExportContext(target=target, adapter=adapter, data=data, reference_model=model)
        res = OnnxExporter(OnnxExportConfig(verify_batch_sizes=(1, 8), verify_lengths=(16, 128))).export(
            model, ectx, out_dir
        )
        files[key] = out_dir / res.artifacts["onnx"]
        rows[key] = {
            "layers": layers,
            "ffn": ffn,
            "params": int(fid["params"]),
            "one_shot_mean_cosine": round(fid["mean_cosine"], 5),
            "one_shot_min_cosine": round(fid["min_cosine"], 5),
            "onnx_verify_min_cosine": round(res.verification["onnx"]["min_cosine"], 6),
            "int8_weights": res.verification["onnx"].get("int8_weights"),
        }
        log.info("%s: %s", key, rows[key])

    stats = time_onnx_against_fp32(
        adapter, teacher, files, work, args.batch, args.seq_len, args.threads, args.warmup, args.repeats
    )
    base = stats["ort_fp32"]["median_ms"]
    for key, row in rows.items():
        row["median_ms"] = stats[key]["median_ms"]
        row["p90_ms"] = stats[key]["p90_ms"]
        row["speedup_vs_ort_fp32"] = round(base / stats[key]["median_ms"], 3)

    import onnxruntime as ort

    result = {
        "benchmark": "pruned_shapes_cpu",
        "command": "python benchmarks/pruned_shapes_cpu.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags()},
        "settings": {
            "shape": f"{args.batch}x{args.seq_len}",
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "onnxruntime": ort.__version__,
            "quantize": quantize,
            "fidelity": f"one-shot (no distillation), {spec.eval_samples} held-out texts",
        },
        "ort_fp32": stats["ort_fp32"],
        "shapes": rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruned_shapes_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# all-MiniLM-L6-v2: pruned shapes, int8, ONNX Runtime on this CPU (one side-by-side run)",
        "",
        f"`{result['command']}` on {result['date_utc']}; CPU flags {', '.join(result['machine']['flags'])}; "
        f"onnxruntime {ort.__version__}, {args.threads} threads, {args.batch}x{args.seq_len}, median of "
        f"{args.repeats} rotated runs; ORT fp32 (transformers' export) {base:.1f} ms. Fidelity: one-shot "
        f"(pruned + int8, no distillation) vs the original on {spec.eval_samples} held-out texts.",
        "",
        "| layers | FFN | params | median ms | vs ORT fp32 | one-shot mean cos | min cos |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row['layers']} | {row['ffn']} | {row['params']:,} | {row['median_ms']:.1f} | "
            f"{row['speedup_vs_ort_fp32']:.2f}x | {row['one_shot_mean_cosine']:.4f} | {row['one_shot_min_cosine']:.4f} |"
        )
    (args.out / "pruned_shapes_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
