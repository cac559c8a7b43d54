"""all-MiniLM-L6-v2 on the CPU: our bundles against torch, ONNX Runtime fp32 and ORT's own int8.

One run, one machine, the same held-out texts for everyone:
- torch fp32 (eager, transformers);
- ORT fp32: the model exported as-is (``torch.onnx.export``) and run in ONNX Runtime;
- ORT fp32 + our graph: our export graph (fused attention), no quantization;
- ORT int8 ``quantize_dynamic`` per-channel: the peer, what a user does today;
- each bundle given with ``--bundle NAME=DIR`` (default: compile ``minilm-cpu-int8``).

Latency: held-out texts padded to the timed length (32x128, 1x128, 32x256), 2 threads; the
engines are timed in alternation, run by run, so a noisy machine slows all alike; medians and
ratios against ORT fp32. Fidelity against the fp32 embeddings on the broad default's held-out
texts (``compressor.text_data``) up to the serving length 256: pooled, per evaluation domain
(``dataset-descriptions`` is a domain no recipe calibrates or trains on) and per length bucket.
Batch invariance: one short sentence embedded alone and inside a batch padded to 256 tokens by
a long batch-mate (the cosine of the two). Writes ``benchmarks/results/minilm_cpu.{json,md}``.

    python benchmarks/minilm_cpu.py [--bundle NAME=DIR ...] [--repeats 10]
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

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((32, 128), (1, 128), (32, 256))
SHORT = "The results would not generalize to other documents from outside this window of time."


def build_bundle(out: Path) -> Path:
    import dataclasses

    from compressor.app.compile import compile_recipe
    from compressor.recipe import load_recipe

    recipe = load_recipe("minilm-cpu-int8")
    recipe = dataclasses.replace(recipe, evaluation=dataclasses.replace(recipe.evaluation, run_bench=False))
    compile_recipe(recipe, out, overwrite=True, progress=True, on_stage=lambda m: print(m, file=sys.stderr))
    return out


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f)


def sessions_for(args: argparse.Namespace, adapter: Any, model: Any, tmp: Path) -> tuple[dict, dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from compressor.bundle import verify_bundle
    from compressor.exporters.onnx.onnx import export_onnx, ort_session
    from compressor.text_data import held_out_texts

    example = adapter.tokenize(held_out_texts(2, 0, 16), 16)
    plain = adapter.export_spec(copy.deepcopy(model), example, fused=False)
    export_onnx(plain.module, plain, tmp / "fp32.onnx", 17)
    fused = adapter.export_spec(copy.deepcopy(model), example, fused=True)
    export_onnx(fused.module, fused, tmp / "fp32_graph.onnx", 17)
    quantize_dynamic(
        str(tmp / "fp32.onnx"), str(tmp / "peer.onnx"), per_channel=True, weight_type=QuantType.QInt8
    )
    sessions = {
        "ort_fp32": ort_session(tmp / "fp32.onnx", args.threads),
        "ort_fp32_our_graph": ort_session(tmp / "fp32_graph.onnx", args.threads),
        "ort_int8_quantize_dynamic": ort_session(tmp / "peer.onnx", args.threads),
    }
    labels = {
        "torch_fp32": "torch fp32 (eager)",
        "ort_fp32": "ORT fp32 (plain export)",
        "ort_fp32_our_graph": "ORT fp32, our graph (no quantization)",
        "ort_int8_quantize_dynamic": "ORT int8 quantize_dynamic per-channel (peer)",
    }
    bundles = args.bundle or [
        f"minilm-cpu-int8={build_bundle(Path(__file__).resolve().parent / '.cache' / 'minilm-cpu-int8')}"
    ]
    for spec in bundles:
        name, _, folder = spec.partition("=")
        manifest = verify_bundle(Path(folder))
        sessions[name] = ort_session(Path(folder) / manifest["artifacts"]["onnx"], args.threads)
        invariant = (manifest.get("batch_invariance") or {}).get("batch_invariant")
        labels[name] = f"compressor bundle {manifest.get('name')} (batch-invariant: {invariant})"
    return sessions, labels


def run_all(sess: Any, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    names = {i.name for i in sess.get_inputs()}
    return torch.cat(
        [
            torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0])
            for b in batches
        ]
    )


def fidelity(adapter: Any, model: Any, sessions: dict, eval_texts: int) -> dict[str, dict[str, float]]:
    from compressor.adapters.hf_encoder import embedding_fidelity
    from compressor.adapters.text_batches import grouped_eval_batches
    from compressor.recipe import DataSpec
    from compressor.text_data import text_data

    texts = text_data(DataSpec(calibration_samples=1, train_samples=0, eval_samples=eval_texts), 0, 256)
    batches, groups = grouped_eval_batches(adapter.tokenizer, adapter.tokenize, texts.eval, 32, 256)
    with torch.no_grad():
        refs = [adapter.forward(model, b) for b in batches]
    outs = {"torch_fp32": refs} | {n: [run_all(s, [b]) for b in batches] for n, s in sessions.items()}
    result: dict[str, dict[str, float]] = {}
    for name, out in outs.items():
        row = embedding_fidelity(torch.cat(out), torch.cat(refs))
        for group, idx in groups.items():
            part = embedding_fidelity(torch.cat([out[i] for i in idx]), torch.cat([refs[i] for i in idx]))
            row[f"mean_cosine@{group}"] = part["mean_cosine"]
        result[name] = {k: round(v, 5) for k, v in row.items()}
    return result


def invariance(adapter: Any, sessions: dict) -> dict[str, float]:
    from compressor.text_data import held_out_texts

    long_text = next(t for t in held_out_texts(64, 0, 256) if len(t) > 1000)
    alone = adapter.tokenize([SHORT], 256)
    padded = adapter.tokenize([SHORT, long_text], 256)
    out = {}
    for name, sess in sessions.items():
        a, b = run_all(sess, [alone])[0].numpy(), run_all(sess, [padded])[0].numpy()
        out[name] = round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 6)
    return out


def latency(args: argparse.Namespace, adapter: Any, model: Any, sessions: dict) -> dict[str, dict[str, Any]]:
    from compressor.app.timing import latency_stats, time_side_by_side
    from compressor.text_data import held_out_texts

    out: dict[str, dict[str, Any]] = {}
    for bs, seq in SHAPES:
        feed_t = adapter.tokenize(held_out_texts(bs, 1, seq), seq, pad_to_max=True)
        feed = {k: v.numpy() for k, v in feed_t.items()}
        runs = {name: (lambda s=sess, f=feed: s.run(None, f)) for name, sess in sessions.items()}

        def torch_run(batch: dict[str, torch.Tensor] = feed_t) -> None:
            with torch.no_grad():
                adapter.forward(model, batch)

        runs = {"torch_fp32": torch_run, **runs}
        times = time_side_by_side(runs, args.warmup, args.repeats)
        out[f"{bs}x{seq}"] = {name: latency_stats(t, bs) for name, t in times.items()}
    return out


def write(args: argparse.Namespace, result: dict[str, Any]) -> str:
    shapes = [f"{b}x{s}" for b, s in SHAPES]
    domains = sorted(k for k in result["rows"][0] if k.startswith("mean_cosine@domain="))
    lengths = sorted(
        (k for k in result["rows"][0] if k.startswith("mean_cosine@len=")),
        key=lambda k: int(k.split("=")[1].split("-")[0]),
    )
    head = (
        ["engine"]
        + [f"ms {s} (vs ORT fp32)" for s in shapes]
        + ["mean cos"]
        + [d.split("=")[1] for d in domains]
    )
    head += [k.split("@")[1] for k in lengths] + ["alone vs padded batch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["label"]] + [
            f"{r[f'median_ms_{s}']:.1f} ({r[f'speedup_vs_ort_fp32_{s}']:.2f}x)" for s in shapes
        ]
        cells += (
            [f"{r['mean_cosine']:.5f}"] + [f"{r[d]:.5f}" for d in domains] + [f"{r[k]:.5f}" for k in lengths]
        )
        cells.append(f"{r['batch_invariance_cosine']:.6f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_cpu.json").write_text(json.dumps(result, indent=2))
    (args.out / "minilm_cpu.md").write_text(
        f"# all-MiniLM-L6-v2 on the CPU ({args.threads} threads)\n\n"
        f"`{result['command']}` on {result['date_utc']}, ONNX Runtime {result['onnxruntime']}, CPU flags "
        f"{' '.join(result['machine']['cpu_flags'])}; {result['eval_texts']} held-out texts per domain up to "
        f"256 tokens, median of {args.repeats} interleaved runs.\n\n" + table
    )
    return table


def main() -> int:
    import onnxruntime as ort

    from compressor.adapters.hf_encoder import HFEncoderAdapter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", help="NAME=DIR of a bundle to compare (repeatable)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-texts", type=int, default=256, help="held-out texts per evaluation domain")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    adapter = HFEncoderAdapter()
    model = adapter.load("default")
    sessions, labels = sessions_for(args, adapter, model, Path(tempfile.mkdtemp(prefix="minilm-bench-")))
    fid = fidelity(adapter, model, sessions, args.eval_texts)
    inv = {"torch_fp32": 1.0} | invariance(adapter, sessions)
    lat = latency(args, adapter, model, sessions)
    rows = []
    for name in labels:
        row: dict[str, Any] = {"engine": name, "label": labels[name]}
        for shape, per in lat.items():
            row[f"median_ms_{shape}"] = per[name]["median_ms"]
            row[f"speedup_vs_ort_fp32_{shape}"] = round(
                per["ort_fp32"]["median_ms"] / per[name]["median_ms"], 3
            )
        row.update(fid[name])
        row["batch_invariance_cosine"] = inv[name]
        rows.append(row)
    result = {
        "benchmark": "minilm_cpu",
        "command": "python benchmarks/minilm_cpu.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "cpu_flags": cpu_flags(),
        },
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "eval_texts": args.eval_texts,
        "repeats": args.repeats,
        "rows": rows,
        "latency": lat,
    }
    print(write(args, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
