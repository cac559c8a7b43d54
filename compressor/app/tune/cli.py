"""`compressor tune` on the command line, and the files it writes.

``--out tuned.yaml`` writes the recipe, and beside it ``tune-report.html`` and
``tune.json``. Nothing is written until the tune has a plan, each file whole or not at all,
and only files an earlier tune wrote are replaced (the recipe's first line is the tuner's
marker; ``tune.json`` carries its ``tune`` key): anything else at those paths is the
user's, and the tune refuses before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from compressor.app.arguments import int_list
from compressor.errors import CompressorError

TUNE_FILES = ("tune-report.html", "tune.json")


def parse_duration(text: str) -> float:
    """``30m``, ``90s``, ``1h`` or plain seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise CompressorError(f"--time {text!r}: write a duration like 30m, 90s or 1h") from None


def parse_structures(text: str | None) -> tuple[tuple[int, int], ...] | None:
    """``6x1536,5x1024`` (layers x FFN width); ``none`` for no pruning; None for the grid."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    out = []
    for part in text.split(","):
        layers, _, ffn = part.strip().partition("x")
        try:
            out.append((int(layers), int(ffn)))
        except ValueError:
            raise CompressorError(f"--structures {text!r}: write LAYERSxFFN,..., e.g. 5x1024,4x768") from None
    return tuple(out)


def _ours_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("tune") == 1


def _ours_recipe(path: Path) -> bool:
    from compressor.app.tune.plan_recipe import MARKER

    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().rstrip("\n") == MARKER
    except (OSError, UnicodeDecodeError):
        return False


def check_tune_outputs(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over what an earlier tune did not write."""
    if out.suffix not in (".yaml", ".yml"):
        raise CompressorError(f"tune --out {out}: the recipe's file name must end in .yaml")
    folder = out.parent
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise CompressorError(f"tune --out {out}: {parent} is a file; choose another --out")
    if os.path.lexists(out):
        if out.is_symlink() or not out.is_file() or not _ours_recipe(out):
            raise CompressorError(
                f"tune --out {out}: exists and is not a recipe compressor tune wrote; choose another --out"
            )
        if not overwrite:
            raise CompressorError(
                f"tune --out {out}: exists (an earlier tune's); pass --overwrite to replace it"
            )
    present = [n for n in TUNE_FILES if os.path.lexists(folder / n)]
    if present and not (_ours_json(folder / "tune.json") and not (folder / "tune.json").is_symlink()):
        raise CompressorError(
            f"tune --out {out}: {folder} holds {', '.join(present)} that compressor tune did not write; "
            "choose another folder"
        )
    if present and not overwrite:
        raise CompressorError(
            f"tune --out {out}: {folder} holds an earlier tune's report; pass --overwrite to replace it"
        )


def options_from_args(args: argparse.Namespace, name: str) -> Any:
    from compressor.app.tune.options import Budget, TuneOptions

    return TuneOptions(
        budget=Budget.parse(args.budget),
        target=args.target or "cpu",
        recipe=getattr(args, "recipe", None),
        model=None if args.model in (None, "default") else args.model,
        batches=tuple(args.batch),
        seq_len=args.seq_len,
        threads=args.threads,
        time_limit_s=parse_duration(args.time),
        structures=parse_structures(args.structures),
        probe_steps=args.probe_steps,
        recover_steps=args.recover_steps,
        verify=not getattr(args, "no_verify", False),
        max_verify=args.max_verify,
        name=name,
    )


def run_tune(opts: Any) -> Any:
    from compressor.app.tune.tune import tune
    from compressor.progress import tqdm_progress

    start = time.perf_counter()

    def stage(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return tune(opts, progress=tqdm_progress, stage=stage)


def cmd_tune(args: argparse.Namespace) -> int:
    from compressor.app.bench_outputs import write_atomic
    from compressor.app.tune.plan_recipe import recipe_yaml
    from compressor.app.tune.report import render_tune_html, summary_lines, tune_record

    out = Path(args.out)
    check_tune_outputs(out, args.overwrite)
    opts = options_from_args(args, out.stem)
    result = run_tune(opts)
    print("\n".join(summary_lines(result)))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.parent / "tune.json", json.dumps(tune_record(result), indent=1) + "\n")
    write_atomic(out.parent / "tune-report.html", render_tune_html(result))
    if result.recipe is None:
        raise CompressorError(
            f"tune: no plan meets {opts.budget.text} (report: {out.parent / 'tune-report.html'}); "
            "lower the budget or allow more structures / time"
        )
    write_atomic(out, recipe_yaml(result.recipe, header_lines(result)))
    print(f"\nrecipe: {out}   report: {out.parent / 'tune-report.html'}   record: {out.parent / 'tune.json'}")
    print(f"compile it: compressor compile --recipe {out}")
    return 0


def header_lines(result: Any) -> list[str]:
    o = result.options
    c = result.chosen
    est = "ESTIMATED (roofline, no engine here)" if result.estimated else "measured"
    lines = [
        f"budget {o.budget.text} on held-out data; target {o.target}; shapes "
        + ", ".join(f"{b}x{s}" for b, s in o.io_shapes),
        f"host: {result.fingerprint.describe()}; latency {est}",
        f"plan: {c.structure}, predicted {c.speedup:.2f}x the original's float model at "
        f"{o.primary[0]}x{o.primary[1]}, estimated calibration {o.budget.metric} {o.budget.value_of(c.fidelity):.5f}",
    ]
    for v in result.verifications:
        if v.plan is c:
            lat = ", ".join(f"{k} {d['speedup']:.2f}x ORT fp32" for k, d in v.latency.items())
            lines.append(f"verified: {o.budget.metric} {v.fidelity:.5f}{v.where}; {lat}")
    return lines


def add_tune_arguments(p: argparse.ArgumentParser, compile_flags: bool = False) -> None:
    """The search's options (shared by ``tune`` and ``compile --tune``)."""
    need = not compile_flags
    p.add_argument(
        "--budget",
        required=need,
        default=None,
        help='the fidelity the tuned model keeps on held-out data: "mean_cosine>=0.97" (sentence encoders) '
        '"perplexity_ratio<=1.05" (decoder LMs, student / teacher) or "fd<=1.2" (diffusion denoisers, '
        "Frechet distance to held-out real images)",
    )
    p.add_argument(
        "--batch",
        type=int_list,
        default=(1, 32),
        help="batch sizes to tune for (the largest is minimised; default 1,32)",
    )
    p.add_argument(
        "--seq-len", type=int, default=128, help="sequence length of the tuned shapes (default 128)"
    )
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--time", default="30m", help="time for profiling, probes and costs (default 30m)")
    p.add_argument(
        "--structures", default=None, help="LAYERSxFFN,... to try (default a grid; none = no pruning)"
    )
    p.add_argument("--probe-steps", type=int, default=100, help="recovery steps of each structure's probe")
    p.add_argument("--recover-steps", type=int, default=1000, help="recovery steps of the chosen structure")
    p.add_argument(
        "--max-verify", type=int, default=3, help="plans compiled and measured at most (stepping back)"
    )


def add_tune(sub: Any) -> None:
    t = sub.add_parser(
        "tune", help="choose each layer's form by latency measured on the target; write a recipe"
    )
    t.add_argument(
        "--model", default="default", help="a Hugging Face model folder, or default (all-MiniLM-L6-v2)"
    )
    t.add_argument(
        "--target", default="cpu", help="cpu (measured in ONNX Runtime here), a100, h100, orin (estimated)"
    )
    t.add_argument(
        "--recipe", default=None, help="base recipe for the data and exports (default: the target's)"
    )
    t.add_argument(
        "--out", default="tuned.yaml", help="the recipe to write; tune-report.html and tune.json go beside it"
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier tune's recipe and report (never other files)",
    )
    t.add_argument("--no-verify", action="store_true", help="write the plan without compiling and timing it")
    add_tune_arguments(t)
    t.set_defaults(func=cmd_tune)
