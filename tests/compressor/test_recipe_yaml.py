"""compressor.recipe_yaml: a recipe file, untrusted input, read within bounds.

``tests/compressor/test_bad_inputs.py`` drives many refusals through the CLI; here
``load_yaml`` / ``read_recipe_text`` are called directly for the exact messages and the edges
of each bound (one under is read, one over is refused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.errors import RecipeError
from compressor.recipe_yaml import (
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DEPTH,
    MAX_RECIPE_NODES,
    load_yaml,
    read_recipe_text,
)


def _refused(text: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_yaml(text, "r.yaml")
    return str(e.value)


def test_a_recipe_reads_as_plain_data() -> None:
    text = (
        "name: tiny\n"
        "seed: 3\n"
        "passes:\n"
        "  - pass: quantize\n"
        "    targets: &t ['encoder.*']\n"
        "    alpha: 0.5\n"
        "  - {pass: sparsify, targets: *t, fold: yes, skip: null}\n"
    )
    assert load_yaml(text, "r.yaml") == {
        "name": "tiny",
        "seed": 3,
        "passes": [
            {"pass": "quantize", "targets": ["encoder.*"], "alpha": 0.5},
            {"pass": "sparsify", "targets": ["encoder.*"], "fold": True, "skip": None},
        ],
    }


def test_an_empty_document_is_none() -> None:
    assert load_yaml("", "r.yaml") is None
    assert load_yaml("# only a comment\n", "r.yaml") is None


def test_duplicate_keys_are_refused_with_their_line() -> None:
    assert (
        _refused("name: a\nseed: 1\nname: b\n")
        == "r.yaml: line 3: duplicate key 'name'; each key may appear once"
    )
    nested = "passes:\n  - pass: quantize\n    alpha: 0.5\n    alpha: 0.6\n"
    assert _refused(nested) == "r.yaml: line 4: duplicate key 'alpha'; each key may appear once"


def test_keys_equal_as_text_but_of_other_types_and_merge_keys_are_not_duplicates() -> None:
    assert load_yaml("1: int\n'1': str\n", "r.yaml") == {1: "int", "1": "str"}
    text = "base: &b {lr: 0.1}\nother: &o {steps: 2}\nrun:\n  <<: *b\n  <<: *o\n  steps: 3\n"
    assert load_yaml(text, "r.yaml")["run"] == {"lr": 0.1, "steps": 3}


def test_recursive_aliases_are_refused() -> None:
    assert (
        _refused("passes: &p [*p]\n")
        == "r.yaml: line 1: a recursive YAML alias (a node that contains itself)"
    )
    assert _refused("a: &m {self: *m}\n").endswith("a recursive YAML alias (a node that contains itself)")


def test_depth_bound_at_its_edge() -> None:
    # the outermost list is depth 0: MAX_RECIPE_DEPTH + 1 nested lists reach depth MAX_RECIPE_DEPTH
    ok = MAX_RECIPE_DEPTH + 1
    value = load_yaml("[" * ok + "]" * ok, "r.yaml")
    for _ in range(ok - 1):
        (value,) = value
    assert value == []
    over = ok + 1
    assert (
        _refused("[" * over + "]" * over) == f"r.yaml: line 1: nested deeper than {MAX_RECIPE_DEPTH} levels"
    )


def _aliased(extra: int) -> str:
    """A document of ``99,004 + extra`` nodes once aliases are expanded: a 1,000-node list shared
    98 times (root 1 + key a 1 + list a 1,000 + key b 1 + list b 1 + 98 aliases of 1,000 each)
    and ``extra`` plain scalars."""
    shared = "[" + ", ".join(["x"] * 999) + "]"
    items = ["*a"] * 98 + ["y"] * extra
    return f"a: &a {shared}\nb: [{', '.join(items)}]\n"


def test_node_bound_at_its_edge_counts_aliases_without_expanding() -> None:
    assert 1 + 1 + 1000 + 1 + 1 + 98 * 1000 + 996 == MAX_RECIPE_NODES
    assert len(load_yaml(_aliased(996), "r.yaml")["b"]) == 98 + 996
    assert _refused(_aliased(997)) == (
        "r.yaml: the recipe expands to more than 100,000 YAML nodes (aliases included); a recipe needs a few hundred"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a: [1\n",
            "r.yaml: not valid YAML: line 2, column 1: while parsing a flow sequence expected ',' or ']'",
        ),
        ("a: b: c\n", "r.yaml: not valid YAML: line 1, column 5: mapping values are not allowed here"),
        ("a: *nope\n", "r.yaml: not valid YAML: line 1, column 4: found undefined alias 'nope'"),
        (
            "a: !!python/name:os.system x\n",
            "r.yaml: not valid YAML: line 1, column 4: could not determine a constructor",
        ),
        (
            "a: 1\n---\nb: 2\n",
            "r.yaml: not valid YAML: line 2, column 1: expected a single document in the stream",
        ),
    ],
)
def test_invalid_yaml_names_line_and_column(text: str, message: str) -> None:
    assert _refused(text).startswith(message)


def test_read_recipe_text_strips_a_bom_and_keeps_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: caf\xc3\xa9\n")
    assert read_recipe_text(path) == "name: café\n"
    assert load_yaml(read_recipe_text(path), str(path)) == {"name": "café"}


def test_read_recipe_text_byte_bound_at_its_edge(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    body = "# " + "x" * (MAX_RECIPE_BYTES - 3) + "\n"
    path.write_text(body, encoding="utf-8")
    assert path.stat().st_size == MAX_RECIPE_BYTES
    assert read_recipe_text(path) == body
    path.write_text(body + "\n", encoding="utf-8")
    with pytest.raises(RecipeError) as e:
        read_recipe_text(path)
    assert str(e.value) == f"{path}: larger than 1024 KiB; a recipe is a short YAML file"


def test_read_recipe_text_refusals(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(RecipeError, match=r"missing\.yaml: no such recipe file$"):
        read_recipe_text(missing)
    with pytest.raises(RecipeError, match=r": not a regular file; name a recipe YAML file$"):
        read_recipe_text(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(RecipeError) as e:
        read_recipe_text(latin1)
    assert str(e.value) == f"{latin1}: not UTF-8 text (byte 9 is 0xe9); save it as UTF-8"
