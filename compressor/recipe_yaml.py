"""Reading a recipe file, which is untrusted input, within bounds.

At most ``MAX_RECIPE_BYTES``, UTF-8, one YAML document whose node tree, with every alias
expanded, holds at most ``MAX_RECIPE_NODES`` nodes (a 1 KB "billion laughs" file expands
to billions), no recursive aliases and no duplicate keys (YAML would silently keep the
last one). ``compressor.recipe`` turns what this reads into a typed ``Recipe``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compressor.config import show
from compressor.errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: shipped recipes are about 1 KB
MAX_RECIPE_NODES = 100_000  # YAML nodes after alias expansion; a real recipe has a few hundred
MAX_RECIPE_DEPTH = 64  # nesting of mappings and lists


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader; ``load_yaml`` checks the composed node tree before constructing."""


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse a node tree that expands (aliases followed) past ``MAX_RECIPE_NODES`` nodes, nests
    past ``MAX_RECIPE_DEPTH``, refers to itself, or repeats a key in a mapping.

    Aliases share nodes, so the expanded size is counted once per distinct node (memoised),
    never by expanding: a billion-laughs file is refused in microseconds."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise RecipeError(f"{source}: {_where(node)}a recursive YAML alias (a node that contains itself)")
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{source}: {_where(node)}nested deeper than {MAX_RECIPE_DEPTH} levels")
        total = 1
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            active.add(key)
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                seen: set[tuple[str, str]] = set()
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                        if (k.tag, k.value) in seen:
                            raise RecipeError(
                                f"{source}: {_where(k)}duplicate key {show(k.value)}; each key may appear once"
                            )
                        seen.add((k.tag, k.value))
                    children += (k, v)
            else:
                children = list(node.value)
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_RECIPE_NODES:
                    raise RecipeError(
                        f"{source}: the recipe expands to more than {MAX_RECIPE_NODES:,} YAML nodes "
                        "(aliases included); a recipe needs a few hundred"
                    )
            active.discard(key)
        sizes[key] = total
        return total

    size(root, 0)


def _where(node: yaml.Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1}: " if mark is not None else ""


def load_yaml(text: str, source: str) -> Any:
    """One YAML document, safely and within bounds (see the module docstring)."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise RecipeError(f"{source}: not valid YAML: {where}{what}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested deeper than {MAX_RECIPE_DEPTH} levels") from None
    except ValueError as e:  # e.g. an integer past Python's 4,300-digit limit
        raise RecipeError(f"{source}: not a usable YAML value: {' '.join(str(e).split())[:200]}") from None
    finally:
        loader.dispose()


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file: a regular file of at most ``MAX_RECIPE_BYTES``, in UTF-8."""
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    if not path.is_file():
        raise RecipeError(f"{path}: not a regular file; name a recipe YAML file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a short YAML file"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); save it as UTF-8"
        ) from None
