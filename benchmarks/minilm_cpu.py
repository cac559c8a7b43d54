"""all-MiniLM-L6-v2 on the CPU: our bundle against torch, ONNX Runtime fp32 and ORT's own int8.

One run, one machine, the same held-out sentences for everyone:
- torch fp32 (eager, transformers);
- ORT fp32: the model exported as-is (``torch.onnx.export``) and run in ONNX Runtime;
- ORT fp32 + our graph: our export graph (fused attention), no quantization, to show
  how much of the gain is the graph and how much is int8;
- ORT int8 ``quantize_dynamic`` per-channel: the peer, what a user does today;
- our bundle (``compressor compile``, default recipe ``minilm-cpu-int8``).

Latency: real sentences padded to 128 tokens, batch 32 and batch 1, 2 threads; the
engines are timed in alternation, run by run, so a noisy machine slows all alike;
medians and ratios against ORT fp32. Fidelity: mean and min cosine against the fp32
embeddings, and Spearman of the pairwise similarities, on held-out texts (batch 32,
padded to the longest). Writes ``benchmarks/results/minilm_cpu.{json,md}``.

    python benchmarks/minilm_cpu.py [--bundle DIR] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import json
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


def build_bundle(out: Path) -> Path:
    import dataclasses

    from compressor.app.compile import compile_recipe
    from compressor.recipe import load_recipe

    recipe = load_recipe("minilm-cpu-int8")
    recipe = dataclasses.replace(recipe, evaluation=dataclasses.replace(recipe.evaluation, run_bench=False))
    compile_recipe(recipe, out, overwrite=True, progress=True, on_stage=lambda m: print(m, file=sys.stderr))
    return out


def main() -> int:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from compressor.adapters.hf_encoder import HFEncoderAdapter, embedding_fidelity
    from compressor.app.timing import latency_stats, time_side_by_side
    from compressor.bundle import verify_bundle
    from compressor.data import sample, stdlib_docstring_splits
    from compressor.exporters.onnx.onnx import export_onnx, ort_session

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="an existing minilm-cpu-int8 bundle (default: compile one)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-texts", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    bundle = args.bundle or build_bundle(Path(__file__).resolve().parent / ".cache" / "minilm-cpu-int8")
    manifest = verify_bundle(bundle)
    adapter = HFEncoderAdapter()
    model = adapter.load("default")
    held_out = stdlib_docstring_splits().eval

    tmp = Path(tempfile.mkdtemp(prefix="minilm-bench-"))
    example = adapter.tokenize(sample(held_out, 2, 0), 16)
    plain = adapter.export_spec(copy.deepcopy(model), example, fused=False)
    export_onnx(plain.module, plain, tmp / "fp32.onnx", 17)
    fused = adapter.export_spec(copy.deepcopy(model), example, fused=True)
    export_onnx(fused.module, fused, tmp / "fp32_graph.onnx", 17)
    quantize_dynamic(
        str(tmp / "fp32.onnx"), str(tmp / "peer.onnx"), per_channel=True, weight_type=QuantType.QInt8
    )

    sessions: dict[str, Any] = {
        "ort_fp32": ort_session(tmp / "fp32.onnx", args.threads),
        "ort_fp32_our_graph": ort_session(tmp / "fp32_graph.onnx", args.threads),
        "ort_int8_quantize_dynamic": ort_session(tmp / "peer.onnx", args.threads),
        "compressor_bundle": ort_session(bundle / manifest["artifacts"]["onnx"], args.threads),
    }
    labels = {
        "torch_fp32": "torch fp32 (eager)",
        "ort_fp32": "ORT fp32 (plain export)",
        "ort_fp32_our_graph": "ORT fp32, our graph (no quantization)",
        "ort_int8_quantize_dynamic": "ORT int8 quantize_dynamic per-channel (peer)",
        "compressor_bundle": "compressor bundle (minilm-cpu-int8)",
    }

    # Fidelity on held-out text, against the fp32 model's embeddings.
    texts = sample(held_out, args.eval_texts, 0)
    batches = adapter.batches(texts, 32, 128)
    with torch.no_grad():
        ref = torch.cat([adapter.forward(model, b) for b in batches])
    fidelity: dict[str, dict[str, float]] = {"torch_fp32": embedding_fidelity(ref, ref)}
    for name, sess in sessions.items():
        out = torch.cat(
            [torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items()})[0]) for b in batches]
        )
        fidelity[name] = embedding_fidelity(out, ref)

    latency: dict[str, dict[str, Any]] = {}
    for bs in (32, 1):
        feed_t = adapter.tokenize(sample(held_out, bs, 1), 128, pad_to_max=True)
        feed = {k: v.numpy() for k, v in feed_t.items()}
        runs = {name: (lambda s=sess, f=feed: s.run(None, f)) for name, sess in sessions.items()}

        def torch_run(batch: dict[str, torch.Tensor] = feed_t) -> None:
            with torch.no_grad():
                adapter.forward(model, batch)

        runs = {"torch_fp32": torch_run, **runs}
        times = time_side_by_side(runs, args.warmup, args.repeats)
        latency[f"{bs}x128"] = {name: latency_stats(t, bs) for name, t in times.items()}

    rows = []
    for name in labels:
        row: dict[str, Any] = {"engine": name, "label": labels[name]}
        for shape, per in latency.items():
            row[f"median_ms_{shape}"] = per[name]["median_ms"]
            row[f"speedup_vs_ort_fp32_{shape}"] = round(
                per["ort_fp32"]["median_ms"] / per[name]["median_ms"], 3
            )
        row.update({k: round(v, 5) for k, v in fidelity[name].items()})
        rows.append(row)
    result = {
        "benchmark": "minilm_cpu",
        "command": "python benchmarks/minilm_cpu.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "eval_texts": len(texts),
        "repeats": args.repeats,
        "bundle_recipe": manifest.get("name"),
        "rows": rows,
        "latency": latency,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_cpu.json").write_text(json.dumps(result, indent=2))
    header = (
        "| engine | ms 32x128 | vs ORT fp32 | ms 1x128 | vs ORT fp32 | mean cos | min cos | Spearman |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['label']} | {r['median_ms_32x128']:.1f} | {r['speedup_vs_ort_fp32_32x128']:.2f}x | "
        f"{r['median_ms_1x128']:.2f} | {r['speedup_vs_ort_fp32_1x128']:.2f}x | {r['mean_cosine']:.5f} | "
        f"{r['min_cosine']:.5f} | {r['spearman']:.5f} |\n"
        for r in rows
    )
    table = header + body
    (args.out / "minilm_cpu.md").write_text(
        f"# all-MiniLM-L6-v2 on the CPU ({args.threads} threads)\n\n"
        f"`{result['command']}` on {result['date_utc']}, ONNX Runtime {ort.__version__}, "
        f"{len(texts)} held-out texts, median of {args.repeats} interleaved runs.\n\n" + table
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
