"""`compressor`: the command line. The CLI owns the terminal; the library only logs.

`compressor --help` lists every command with its synopsis, built from the parser itself
(``build_parser``), so a new command cannot be missing from it; `compressor COMMAND --help`
gives each command's options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from compressor.app.arguments import int_list
from compressor.app.bench_outputs import check_bench_outputs, write_atomic
from compressor.app.defaults import DEFAULT_GPU_RECIPE, DEFAULT_RECIPE, default_recipe
from compressor.app.info_commands import cmd_kernels, cmd_passes, cmd_recipe, cmd_targets
from compressor.app.tune.cli import add_tune, add_tune_arguments
from compressor.errors import CompressorError

if TYPE_CHECKING:
    from compressor.recipe import Recipe


def _load(args: argparse.Namespace) -> Recipe:
    from compressor.api import load_recipe

    target = getattr(args, "target", None)
    return load_recipe(
        args.recipe or default_recipe(target), target=target, model=getattr(args, "model", None)
    )


def _print_bench(result: dict) -> None:
    from compressor.app.report import (
        bench_table,
        percentile_note,
        second_section,
        skipped_engines,
        text_table,
    )

    print(text_table(bench_table(result)))
    note = percentile_note(result)
    if note:
        print(f"note: {note}")
    heading, table = second_section(result)
    if heading.startswith("Fidelity"):
        heading = "fidelity of each engine vs the original model (held-out texts)"
    print(f"\n{heading}:")
    print(text_table(table))
    for line in skipped_engines(result):
        print(f"not run: {line}")


def cmd_compile(args: argparse.Namespace) -> int:
    from compressor.api import compile_recipe
    from compressor.progress import tqdm_progress
    from compressor.targets import get_target

    recipe = _tuned(args) if args.tune else _load(args)
    get_target(recipe.target)
    out = Path(args.out or f"out/{recipe.name}-{recipe.target}")
    if args.no_bench:
        import dataclasses

        recipe = dataclasses.replace(
            recipe, evaluation=dataclasses.replace(recipe.evaluation, run_bench=False)
        )
    start = time.perf_counter()

    def stage(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    work_dir = Path(args.work_dir) if args.work_dir else None
    manifest = compile_recipe(
        recipe, out, overwrite=args.overwrite, progress=tqdm_progress, on_stage=stage, work_dir=work_dir
    )
    _print_compile_summary(manifest, out, recipe.name)
    return 0


def _tuned(args: argparse.Namespace) -> Recipe:
    """``compile --tune``: the search (unverified: the compile that follows is its verification,
    and its fidelity floor is the budget) and the recipe it writes."""
    from compressor.app.tune.cli import options_from_args, run_tune
    from compressor.app.tune.report import summary_lines
    from compressor.recipe import parse_recipe

    if not args.budget:
        raise CompressorError('compile --tune: needs --budget, e.g. --budget "mean_cosine>=0.97"')
    args.no_verify = True
    opts = options_from_args(args, "tuned")
    result = run_tune(opts)
    print("\n".join(summary_lines(result)), file=sys.stderr)
    if result.recipe is None:
        raise CompressorError(f"compile --tune: no plan meets {opts.budget.text} by the estimates")
    return parse_recipe(result.recipe, source="compile --tune")


def _print_compile_summary(manifest: dict, out: Path, recipe_name: str) -> None:
    """The pass table, what was and was not measured, and the benchmark labelled with the
    hardware it ran on (never a CPU figure presented as a GPU target's)."""
    from compressor.app.report import bench_summary, measurement_notes, pass_table, text_table

    target = manifest.get("target", {})
    name = target.get("name", "?")
    print(f"\nbundle: {out}  ({recipe_name}, target {name})")
    print(f"files: {', '.join(sorted(manifest.get('artifacts', {}).values()))}\n")
    print(text_table(pass_table(manifest["passes"])))
    print("(wall s: each pass and the measuring after it; measure s: that measuring's share)\n")
    for line in measurement_notes(manifest):
        print(line)
    b = manifest.get("benchmark")
    if b:
        if target.get("device") == "cuda" and not str(b.get("device", "cpu")).startswith("cuda"):
            print(f"\nbenchmark: CPU (ONNX Runtime) on this host, not the {name} ({bench_summary(b)}):")
        else:
            print(f"\nbenchmark ({bench_summary(b)}):")
        _print_bench(b)
    print(f"\nmanifest: {out / 'manifest.json'}   report: {out / 'report.md'}")


def cmd_bench(args: argparse.Namespace) -> int:
    from compressor.api import BenchConfig, bench
    from compressor.app.report import render_bench_html, render_bench_markdown

    bundle = Path(args.bundle)
    engines = (
        None if args.engines == "all" else tuple(e.strip() for e in args.engines.split(",") if e.strip())
    )
    cfg = BenchConfig(
        engines=engines,
        batch_sizes=args.batch,
        seq_len=args.seq_len,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        decode_tokens=args.decode_tokens,
        device=args.device,
        baseline=None if args.no_baseline else args.baseline,
        fidelity_texts=args.fidelity_texts,
        runner=Path(args.runner) if args.runner else None,
        trust=args.trust,
    )
    out = Path(args.out) if args.out else bundle.parent / f"{bundle.name}-bench"
    json_path = Path(args.json) if args.json else None
    check_bench_outputs(out, json_path)  # before the minutes of timing: refuse now, not after
    result = bench(bundle, cfg)  # paths and hashes first, then only what the trust allows
    _print_bench(result)
    if not result["trust"]["trusted"]:
        why = result["trust"]["why"]
        print(f"\nnot trusted: {why}: no engine loaded code from it (pass --trust if you trust its author)")
    title = f"{bundle.name}: engines on {result['device']}"
    check_bench_outputs(out, json_path)  # again: something may have appeared while it ran
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "bench.json", json.dumps(result, indent=2))
    write_atomic(out / "bench.md", render_bench_markdown(result, title))
    write_atomic(out / "report.html", render_bench_html(result, title))
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'report.html'}")
    if json_path is not None:
        write_atomic(json_path, json.dumps(result, indent=2))
        print(f"wrote {json_path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from compressor.app.report import text_table
    from compressor.app.verify import describe_bundle
    from compressor.trust import key_path

    bundle = Path(args.bundle)
    trust, rows, n_files, source = describe_bundle(bundle)  # a path or hash problem raises: exit 2
    print(f"bundle: {bundle}")
    print(f"paths and hashes: ok ({n_files} files, {len(rows)} artifacts, every one inside the bundle)")
    print(f"signature: {trust.signature.detail}; this machine's key: {key_path()}")
    if trust.trusted:
        print("trusted: compressor bench loads every artifact below")
    else:
        print(f"not trusted: {trust.why}: compressor bench loads only its ONNX (data); bench --trust")
        print("  loads its code-bearing artifacts too: only for a bundle from an author you trust")
    print(f"original model (bench loads its safetensors for the baseline and fidelity): {source}")
    table = [["artifact", "path", "kind", "engines", "bench loads it"]]
    table += [[r["artifact"], r["path"], r["kind"], r["engines"], r["loads"]] for r in rows]
    print(text_table(table))
    if trust.signature.state in ("mismatch", "malformed"):
        # evidence of tampering (or a damaged copy), not merely a bundle from elsewhere
        print(f"error: {bundle}: {trust.signature.detail}", file=sys.stderr)
        return 2
    return 0


def command_synopses(sub: argparse._SubParsersAction) -> str:
    """One synopsis per subcommand (its usage line without ``usage:`` and ``-h``), from the
    parsers themselves (their one-line helps follow under "positional arguments")."""
    lines = []
    for parser in sub.choices.values():
        usage = " ".join(parser.format_usage().split()).removeprefix("usage: ").replace(" [-h]", "")
        lines.append(f"  {usage}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compressor",
        description="An inference-optimized model compression compiler: recipe -> passes -> exporters -> "
        "a verified bundle.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = p.add_subparsers(dest="command", required=True)
    _add_compile(sub)
    _add_bench(sub)
    _add_listing(sub)
    add_tune(sub)
    p.description = f"{p.description}\n\ncommands:\n{command_synopses(sub)}"
    return p


Subparsers = argparse._SubParsersAction


def _add_compile(sub: Subparsers) -> None:
    c = sub.add_parser("compile", help="run a recipe and write a verified bundle")
    c.add_argument(
        "--recipe",
        default=None,
        help=f"shipped recipe name or YAML path (default: {DEFAULT_RECIPE} for target cpu, "
        f"{DEFAULT_GPU_RECIPE} for a100, h100, orin)",
    )
    c.add_argument("--target", help="override the recipe's target (cpu, a100, h100, orin)")
    c.add_argument("--model", help="override the recipe's model source (a Hugging Face model folder)")
    c.add_argument("--out", help="bundle directory (default out/RECIPE-TARGET)")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the bundle at --out: only a folder compressor wrote that holds nothing its manifest "
        "does not list (never a file, a link, another folder, the current or home directory, the model "
        "or the work dir)",
    )
    c.add_argument("--no-bench", action="store_true", help="skip the benchmark after export")
    c.add_argument(
        "--work-dir",
        help="scratch dir for the passes, kept across runs: a rerun resumes distillation from its "
        "checkpoints (checkpoint_every); default a temporary dir",
    )
    c.add_argument(
        "--tune",
        action="store_true",
        help="choose the plan with the tuner first (--budget and the tune options below); the recipe's "
        "--recipe/--model/--target give the model, data and target",
    )
    add_tune_arguments(c, compile_flags=True)
    c.set_defaults(func=cmd_compile)


def _add_bench(sub: Subparsers) -> None:
    b = sub.add_parser("bench", help="time a bundle on each engine against a baseline and score each one")
    b.add_argument("bundle")
    b.add_argument(
        "--engines",
        default="all",
        help="all (every engine the bundle has an artifact for; those that cannot run here are listed) or "
        "a comma list of ort_fp32, torch_original, ort, ort_qdq, torch_eager, torch_compile, aoti, "
        "native, tensorrt, genai (decoder LM bundles: prefill and decode per token in ONNX Runtime GenAI)",
    )
    b.add_argument("--batch", type=int_list, default=(1, 32), help="batch sizes, e.g. 1,8,32")
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--repeats", type=int, default=20)
    b.add_argument(
        "--decode-tokens",
        type=int,
        default=32,
        help="decoder LM bundles: tokens generated per timed turn (prefill is --seq-len tokens, batch 1)",
    )
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument(
        "--baseline",
        choices=["auto", "ort_fp32", "torch_original"],
        default="auto",
        help="the speedups' reference: auto = ort_fp32 on cpu, torch_original (fp16 eager) on cuda",
    )
    b.add_argument("--no-baseline", action="store_true", help="time no baseline")
    b.add_argument("--fidelity-texts", type=int, default=0, help="held-out texts scored (0: the recipe's)")
    b.add_argument("--runner", help="compressor-run executable (default: built into ~/.cache on first use)")
    b.add_argument("--out", help="folder for bench.json, bench.md, report.html (default BUNDLE-bench)")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument(
        "--trust",
        action="store_true",
        help="load the bundle's code-bearing artifacts (pickled ExportedProgram, AOTInductor library, "
        "TensorRT plan) though it is not signed by this machine's key: only for bundles from authors "
        "you trust",
    )
    b.set_defaults(func=cmd_bench)


def _add_listing(sub: Subparsers) -> None:
    """verify, targets, passes, recipe, kernels."""
    v = sub.add_parser(
        "verify", help="check a bundle's paths, hashes and signature, and list what bench would load"
    )
    v.add_argument("bundle")
    v.set_defaults(func=cmd_verify)

    sub.add_parser("targets", help="print the target records").set_defaults(func=cmd_targets)

    ps = sub.add_parser("passes", help="list the passes")
    ps.add_argument("--verbose", action="store_true", help="also list every option")
    ps.set_defaults(func=cmd_passes)

    r = sub.add_parser("recipe", help="validate or list recipes")
    r.add_argument("action", choices=["validate", "list"])
    r.add_argument("recipe", nargs="?")
    r.add_argument("--target")
    r.add_argument("--static", action="store_true", help="skip loading the model (no layer-pattern checks)")
    r.add_argument("--print", action="store_true", help="print the normalised recipe")
    r.set_defaults(func=cmd_recipe)

    k = sub.add_parser("kernels", help="build every Triton kernel per GPU arch and report tensor-core use")
    k.add_argument("--arch", default="sm_80,sm_87,sm_90")
    k.set_defaults(func=cmd_kernels)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so every ``with`` block cleans up."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up finish
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("transformers", "onnxruntime", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(args.func(args))
    except CompressorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated: no bundle was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted: no bundle was written", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
