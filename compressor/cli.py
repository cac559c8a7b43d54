"""`compressor`: the command line. The CLI owns the terminal; the library only logs.

compressor compile [--recipe NAME|FILE] [--target T] [--model PATH] [--out DIR] [--work-dir DIR]
compressor bench BUNDLE [--engines all|ort,aoti,...] [--batch 1,8,32] [--seq-len 128] [--threads 2]
                [--device cpu|cuda] [--out DIR]
compressor targets
compressor passes [--verbose]
compressor recipe validate FILE|NAME [--target T]
compressor recipe list
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from compressor.errors import CompressorError

DEFAULT_RECIPE = "minilm-cpu-int8"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from compressor.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if getattr(args, "target", None):
        recipe = recipe.with_target(args.target)
    if getattr(args, "model", None):
        recipe = recipe.with_model(args.model)
    return recipe


def _print_bench(result: dict) -> None:  # type: ignore[type-arg]
    from compressor.report import bench_table, fidelity_table, skipped_engines, text_table

    print(text_table(bench_table(result)))
    print("\nfidelity of each engine vs the original model (held-out texts):")
    print(text_table(fidelity_table(result)))
    for line in skipped_engines(result):
        print(f"not run: {line}")


def cmd_compile(args: argparse.Namespace) -> int:
    from compressor.compile import compile_recipe
    from compressor.report import bench_summary, pass_table, text_table
    from compressor.targets import get_target

    recipe = _load(args)
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
        recipe, out, overwrite=args.overwrite, progress=True, on_stage=stage, work_dir=work_dir
    )
    print(f"\nbundle: {out}  ({recipe.name}, target {recipe.target})\n")
    print(text_table(pass_table(manifest["passes"])))
    if manifest.get("benchmark"):
        b = manifest["benchmark"]
        print(f"\nbenchmark ({bench_summary(b)}):")
        _print_bench(b)
    print(f"\nmanifest: {out / 'manifest.json'}   report: {out / 'report.md'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from compressor.bench import BenchConfig, bench_bundle
    from compressor.bundle import verify_bundle
    from compressor.report import render_bench_html, render_bench_markdown

    bundle = Path(args.bundle)
    verify_bundle(bundle)  # the hashes first: some engines load pickled constants or shared libraries
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
        device=args.device,
        baseline=None if args.no_baseline else args.baseline,
        fidelity_texts=args.fidelity_texts,
        runner=Path(args.runner) if args.runner else None,
    )
    result = bench_bundle(bundle, cfg)
    _print_bench(result)
    out = Path(args.out) if args.out else bundle.parent / f"{bundle.name}-bench"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{bundle.name}: engines on {result['device']}"
    (out / "bench.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "bench.md").write_text(render_bench_markdown(result, title), encoding="utf-8")
    (out / "report.html").write_text(render_bench_html(result, title), encoding="utf-8")
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'report.html'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from compressor.targets import format_targets_table

    print(format_targets_table())
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from compressor.config import describe_fields
    from compressor.passes import PASSES

    for name in sorted(PASSES):
        cls = PASSES[name]
        print(f"{name:12s} {cls.description}")
        if args.verbose:
            for field, tp, default, help_ in describe_fields(cls.Config):
                print(f"    {field}: {tp} = {default}\n        {help_}")
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from compressor.recipe import dump_recipe, shipped_recipes

    if args.action == "list":
        for name in sorted(shipped_recipes()):
            print(name)
        return 0
    if not args.recipe:
        raise CompressorError("recipe validate: name a recipe file or shipped recipe")
    recipe = _load(args)
    if args.static:
        print(f"{recipe.source}: valid recipe (static checks only)")
    else:
        from compressor.compile import plan

        plan(recipe)
        print(
            f"{recipe.source}: valid for target {recipe.target} ({len(recipe.passes)} passes, plan checked)"
        )
    if args.print:
        print(dump_recipe(recipe))
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    try:
        from compressor.kernels.arch_report import build_arch_report, format_arch_report
    except ImportError as e:
        raise CompressorError(
            f"kernels: the Triton kernels are not available here ({e}); pip install triton"
        ) from None
    try:
        rows = build_arch_report([a.strip() for a in args.arch.split(",") if a.strip()])
    except ValueError as e:
        raise CompressorError(str(e)) from None
    print(format_arch_report(rows))
    return 0 if all(r.get("ok", True) for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compressor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="run a recipe and write a verified bundle")
    c.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"shipped recipe name or YAML path (default {DEFAULT_RECIPE})",
    )
    c.add_argument("--target", help="override the recipe's target (cpu, a100, h100, orin)")
    c.add_argument("--model", help="override the recipe's model source (a Hugging Face model folder)")
    c.add_argument("--out", help="bundle directory (default out/RECIPE-TARGET)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    c.add_argument("--no-bench", action="store_true", help="skip the benchmark after export")
    c.add_argument(
        "--work-dir",
        help="scratch dir for the passes, kept across runs: a rerun resumes distillation from its "
        "checkpoints (checkpoint_every); default a temporary dir",
    )
    c.set_defaults(func=cmd_compile)

    b = sub.add_parser("bench", help="time a bundle on each engine against a baseline and score each one")
    b.add_argument("bundle")
    b.add_argument(
        "--engines",
        default="all",
        help="all (every engine the bundle has an artifact for; those that cannot run here are listed) or "
        "a comma list of ort_fp32, torch_original, ort, ort_qdq, torch_eager, torch_compile, aoti, "
        "native, tensorrt",
    )
    b.add_argument("--batch", type=_int_list, default=(1, 32), help="batch sizes, e.g. 1,8,32")
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--repeats", type=int, default=20)
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
    b.set_defaults(func=cmd_bench)

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
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("transformers", "onnxruntime", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except CompressorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no bundle was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
