"""The CLI's listing commands: ``targets``, ``passes``, ``recipe validate|list``, ``kernels``.

They print what the registries and records hold (the option list of every pass config,
from its field descriptions) and run no compile; ``compressor.app.cli`` wires them up.
"""

from __future__ import annotations

import argparse

from compressor.errors import CompressorError


def cmd_targets(args: argparse.Namespace) -> int:
    from compressor.targets import format_targets_table

    print(format_targets_table())
    return 0


def _nested_config(tp: object) -> type | None:
    """The dataclass a config field holds (``RecoverConfig | None`` -> RecoverConfig), else None."""
    import dataclasses
    import typing

    candidates = [tp, *typing.get_args(tp)]
    for c in candidates:
        if isinstance(c, type) and dataclasses.is_dataclass(c):
            return c
    return None


def option_lines(cls: type, indent: str = "    ") -> list[str]:
    """Every option of config class ``cls`` with its help; options that are blocks of options
    themselves (``recover:``, ``loss:``) list theirs below them, one level further in."""
    import typing

    from compressor.config import describe_fields

    hints = typing.get_type_hints(cls)
    lines = []
    for field, tp, default, help_ in describe_fields(cls):
        nested = _nested_config(hints[field])
        if nested is not None:
            shown = "null (off)" if default == "None" else "{...}"
            lines.append(f"{indent}{field}: block ({nested.__name__}) = {shown}")
            lines.append(f"{indent}    {help_}")
            lines += option_lines(nested, indent + "    ")
        else:
            lines.append(f"{indent}{field}: {tp} = {default}")
            lines.append(f"{indent}    {help_}")
    return lines


def cmd_passes(args: argparse.Namespace) -> int:
    from compressor.config import config_classes
    from compressor.passes import PASSES

    width = max(len(n) for n in PASSES) + 2
    for name in sorted(PASSES):
        cls = PASSES[name]
        print(f"{name:<{width}}{cls.description}")
        if args.verbose:
            configs = config_classes(cls.Config)
            for config in configs:  # one per scheme (quantize: method int8 | fp8 | int4)
                if len(configs) > 1:
                    print(f"  method: {config().method}")
                for line in option_lines(config, indent="      " if len(configs) > 1 else "    "):
                    print(line)
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from compressor.recipe import dump_recipe, shipped_recipes

    if args.action == "list":
        for name in sorted(shipped_recipes()):
            print(name)
        return 0
    if not args.recipe:
        raise CompressorError("recipe validate: name a recipe file or shipped recipe")
    from compressor.api import load_recipe

    recipe = load_recipe(args.recipe, target=args.target)
    if args.static:
        print(f"{recipe.source}: valid recipe (static checks only)")
    else:
        from compressor.app.compile import plan

        plan(recipe)
        print(
            f"{recipe.source}: valid for target {recipe.target} ({len(recipe.passes)} passes, plan checked)"
        )
    if args.print:
        print(dump_recipe(recipe))
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from compressor.kernels.triton_support import HAS_TRITON, KERNELS_EXTRA

    if not HAS_TRITON:
        raise CompressorError(
            f"kernels: building the Triton kernels needs triton, the optional kernels extra: {KERNELS_EXTRA}"
        )
    from compressor.kernels.arch_report import build_arch_report, format_arch_report

    try:
        rows = build_arch_report([a.strip() for a in args.arch.split(",") if a.strip()])
    except ValueError as e:
        raise CompressorError(str(e)) from None
    print(format_arch_report(rows))
    return 0 if all(r.get("ok", True) for r in rows) else 1
