"""all-MiniLM-L6-v2 on the CPU: how fast is each pruned shape once it is int8, in ONNX Runtime?

Structured pruning trades fidelity for speed, and how much speed a shape buys depends on
the machine (an int8 GEMM is several times faster than fp32 with AVX-512 VNNI, barely
faster without it). This scan answers "which depth x FFN width reaches N x ORT fp32 here"
before any distillation is spent on a shape: every shape is pruned from the packaged model
by the ``prune`` pass (activation importance on the calibration texts, no recovery), made
int8 by the ``quantize`` pass as ``minilm-cpu-pruned-int8`` does it (SmoothQuant, dynamic
per-tensor activations; no float layers kept, so the figures are the all-int8 case), exported
by our ``onnx`` exporter (verified in ORT against torch) and timed side by side with ORT fp32
of transformers' own export (engines rotated, ``compressor.app.timing.time_side_by_side``), batch
x 128 held-out sentences padded to 128 tokens. The one-shot fidelity of each shape (no
distillation) is recorded too: it says how much a shape loses before recovery.

    python benchmarks/pruned_shapes_cpu.py [--shapes 6x1536,4x768] [--batch 32] [--threads 2]

Writes ``benchmarks/results/pruned_shapes_cpu.{json,md}`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
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


QUANTIZE = {"method": "int8", "targets": ["encoder.*"], "smoothquant": True, "alpha_grid": [0.6, 0.8]}
DATA = {"calibration_samples": 128, "train_samples": 0, "eval_samples": 256, "batch_size": 32}


def shape_recipe(layers: int, ffn: int) -> Any:
    """The recipe one shape is compiled with: prune to ``layers`` x ``ffn`` (none for the
    unpruned 6x1536), int8 SmoothQuant, a verified ONNX export, no benchmark."""
    from compressor.recipe import parse_recipe

    passes: list[dict[str, Any]] = []
    if (layers, ffn) != (6, 1536):
        passes.append({"pass": "prune", "layers": layers, "ffn": ffn, "ffn_multiple_of": 64})
    passes.append({"pass": "quantize", **QUANTIZE})
    raw = {
        "name": f"pruned-{layers}x{ffn}",
        "target": "cpu",
        "seed": 0,
        "data": DATA,
        "passes": passes,
        "exports": [{"format": "onnx", "verify_batch_sizes": [1, 8], "verify_lengths": [16, 128]}],
        "evaluation": {"run_bench": False},
    }
    return parse_recipe(raw, f"pruned_shapes_cpu {layers}x{ffn}")


def compile_shape(layers: int, ffn: int, work: Path) -> tuple[dict[str, Any], Path, Any]:
    """One shape through the Python API: its table row, its ONNX file and the compressed run."""
    from compressor import api

    c = api.compress(shape_recipe(layers, ffn), work_dir=work / "scratch")
    manifest = api.export(c, work / f"{layers}x{ffn}", run_bench=False)
    fid, onnx = c.metrics, manifest["verification"]["onnx"]
    row = {
        "layers": layers,
        "ffn": ffn,
        "params": int(fid["params"]),
        "one_shot_mean_cosine": round(fid["mean_cosine"], 5),
        "one_shot_min_cosine": round(fid["min_cosine"], 5),
        "onnx_verify_min_cosine": round(onnx["min_cosine"], 6),
        "int8_weights": onnx.get("int8_weights"),
    }
    return row, work / f"{layers}x{ffn}" / manifest["artifacts"]["onnx"], c


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from compressor.app.timing import time_onnx_against_fp32

    args = parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("compressor").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pruned-shapes-"))
    rows: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {}
    for layers, ffn in shapes:
        key = f"{layers}x{ffn}"
        rows[key], files[key], c = compile_shape(layers, ffn, work)
        log.info("%s: %s", key, rows[key])
    adapter, teacher = c.adapter, c.teacher  # the original model (the same for every shape)
    stats = time_onnx_against_fp32(
        adapter, teacher, files, work, args.batch, args.seq_len, args.threads, args.warmup, args.repeats
    )
    base = stats["ort_fp32"]["median_ms"]
    for key, row in rows.items():
        row["median_ms"] = stats[key]["median_ms"]
        row["p90_ms"] = stats[key]["p90_ms"]
        row["speedup_vs_ort_fp32"] = round(base / stats[key]["median_ms"], 3)

    write_results(args, rows, stats, time.perf_counter() - t_start)
    return 0


def write_results(
    args: argparse.Namespace, rows: dict[str, dict[str, Any]], stats: dict[str, Any], wall_s: float
) -> None:
    """pruned_shapes_cpu.json and .md under ``--out`` (and the table on stdout)."""
    import onnxruntime as ort

    base = stats["ort_fp32"]["median_ms"]
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
            "quantize": QUANTIZE,
            "fidelity": f"one-shot (no distillation), {DATA['eval_samples']} held-out texts",
        },
        "ort_fp32": stats["ort_fp32"],
        "shapes": rows,
        "wall_s": round(wall_s, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruned_shapes_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# all-MiniLM-L6-v2: pruned shapes, int8, ONNX Runtime on this CPU (one side-by-side run)",
        "",
        f"`{result['command']}` on {result['date_utc']}; CPU flags {', '.join(result['machine']['flags'])}; "
        f"onnxruntime {ort.__version__}, {args.threads} threads, {args.batch}x{args.seq_len}, median of "
        f"{args.repeats} rotated runs; ORT fp32 (transformers' export) {base:.1f} ms. Fidelity: one-shot "
        f"(pruned + int8, no distillation) vs the original on {DATA['eval_samples']} held-out texts.",
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


if __name__ == "__main__":
    raise SystemExit(main())
