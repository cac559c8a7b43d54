"""The docs stay true to the code: generated option lists are current, and every relative link
in README.md, docs/ and benchmarks/README.md points at a file (and heading) that exists."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").rglob("*.md")])
_LINK = re.compile(r"(?<!!)\[(?:[^\]]|\\\])*\]\(([^)\s]+)\)")


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_docs", module)
    spec.loader.exec_module(module)
    return module


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in re.sub(r"```.*?```", "", text, flags=re.DOTALL).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(text: str) -> list[str]:
    """Link targets in ``text`` outside code, minus URLs and mail links."""
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    # inline code spans, paired left to right; one that is a link's whole text stays
    prose = re.sub(r"(\[?)`[^`\n]*`(\]?)", lambda m: m.group(0) if m.group(1) and m.group(2) else "", prose)
    return [t for t in _LINK.findall(prose) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_generated_docs_are_current() -> None:
    stale = _gen_docs().stale_files()
    assert stale == [], f"stale generated docs: {stale}; run: .venv/bin/python scripts/gen_docs.py"


def test_check_fails_on_a_changed_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block that no longer matches the code is reported, and --check exits 1."""
    gen = _gen_docs()
    page = ROOT / "docs" / "passes" / "prune.md"
    original = page.read_text(encoding="utf-8")
    edited = original.replace("| `ffn_multiple_of` |", "| `ffn_multiple_off` |")
    assert edited != original
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        return edited if self == page else real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert gen.stale_files() == ["docs/passes/prune.md"]
    assert gen.main(["--check"]) == 1


def test_every_pass_and_exporter_is_documented() -> None:
    from compressor.exporters import EXPORTERS
    from compressor.passes import PASSES

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    exporters = (ROOT / "docs" / "exporters.md").read_text(encoding="utf-8")
    family_pages = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs" / "passes").glob("*.md"))
    for name in PASSES:
        assert f"| `{name}` |" in readme and f"### `{name}`" in family_pages, name
    for name in EXPORTERS:
        assert f"| `{name}` |" in readme and f"### `{name}`" in exporters, name


def test_link_parser_sees_links_and_skips_code() -> None:
    text = "see [a](x.md) and [`b`](y/z.py#top), not `[c](no.md)` nor [u](https://e.org)\n"
    assert relative_links(text) == ["x.md", "y/z.py#top"]
    assert github_anchors("# The bundle\n## TensorRT: Q/DQ ONNX (GPU)\n## The bundle\n") == {
        "the-bundle",
        "tensorrt-qdq-onnx-gpu",
        "the-bundle-1",
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in relative_links(text):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif (
            anchor and dest.suffix == ".md" and anchor not in github_anchors(dest.read_text(encoding="utf-8"))
        ):
            broken.append(f"{target} (no such heading)")
    assert broken == [], f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_file_paths_in_prose_exist(page: Path) -> None:
    """A path written as code (`passes/prune/prune.py`) names a file of the checkout (from its
    root, or from the page's folder), so a moved module cannot leave its old name behind."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    missing = [
        p
        for p in re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|cpp|yaml|sh|md))`", text)
        if not (ROOT / p).exists() and not (page.parent / p).exists()
    ]
    assert missing == [], f"{page.relative_to(ROOT)}: no such file: {missing}"


def test_recipe_snippets_parse() -> None:
    """Every YAML example with passes or exports is a valid recipe (keys, types, bounds), so a
    renamed or removed option fails here rather than in a reader's first compile."""
    import yaml

    from compressor.recipe import parse_recipe

    checked = 0
    for page in PAGES:
        for n, block in enumerate(
            re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)
        ):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and ("passes" in data or "exports" in data):
                parse_recipe(data, f"{page.relative_to(ROOT)} yaml block {n}")
                checked += 1
    assert checked >= 5


def test_python_snippets_import_what_exists() -> None:
    """Every ``from compressor... import a, b`` in a Python example names something that exists."""
    import importlib

    checked = 0
    for page in PAGES:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL):
            for module, names in re.findall(
                r"^from (compressor[\w.]*) import ([\w, ]+)$", block, re.MULTILINE
            ):
                imported = importlib.import_module(module)
                for name in (n.strip() for n in names.split(",")):
                    assert hasattr(imported, name), f"{page.relative_to(ROOT)}: {module} has no {name}"
                    checked += 1
    assert checked >= 4
