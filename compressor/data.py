"""Real text that ships on every machine, in three domains.

Calibration, distillation and evaluation need natural text, and a compiler must not
fetch data sets at run time. What every machine with compressor installed has:

- ``python-docstrings``: docstring paragraphs of the Python standard library (PSF licence),
  read from the stdlib *source files* with ``ast`` (nothing is imported, so no module runs);
- ``python-reference``: the prose of the Python language and library reference that CPython
  ships for ``help()`` (``pydoc_data/topics.py``, PSF licence; read as a literal, not imported);
- ``dataset-descriptions``: scikit-learn's descriptions of its bundled data sets
  (``sklearn/datasets/descr/*.rst``, BSD-3-Clause): scientific writing about measurements,
  studies and their references. This domain is **held out whole**: no calibration or
  training text comes from it, so its fidelity is the out-of-domain figure.

Each paragraph is assigned to a split by a hash of its text: the same paragraph always
lands in the same split, so held-out text stays held out across runs and Python versions.
No package on PyPI ships general English prose (news, fiction) that installs cleanly with
its licence stated; the reference prose and the descriptions are the broadest text at hand.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import os
import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

# A fixed list, so the corpus does not depend on what else is installed.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email.message", "email.utils", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib",
    "importlib.abc", "inspect", "ipaddress", "json.decoder", "json.encoder", "logging", "logging.handlers",
    "lzma", "mailbox", "mimetypes", "multiprocessing.pool", "multiprocessing.process", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "sqlite3.dbapi2", "ssl", "statistics", "string", "subprocess", "sysconfig", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)  # fmt: skip

# Folders of the stdlib tree that hold no library prose (tests, demos, bundled wheels, GUIs).
_NOT_LIBRARY = frozenset(
    {"test", "tests", "idle_test", "idlelib", "turtledemo", "tkinter", "lib2to3", "ensurepip", "site-packages",
     "dist-packages", "__pycache__"}
)  # fmt: skip

_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|[-=*~^]{3,}|\$ |#|:param|:return|:raises)")


@dataclass(frozen=True)
class TextSplits:
    calibration: tuple[str, ...]
    train: tuple[str, ...]
    eval: tuple[str, ...]


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _paragraphs(doc: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = block.strip().splitlines()
        if not lines or any(_CODE_LINE.match(line) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        text = re.sub(r"\s+", " ", text)
        letters = sum(c.isalpha() for c in text)
        if 40 <= len(text) <= 700 and letters / len(text) > 0.7 and " " in text:
            out.append(text)
    return out


def _split_of(text: str) -> str:
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 20
    if bucket < 4:
        return "eval"  # 20 %
    if bucket < 6:
        return "calibration"  # 10 %
    return "train"  # 70 %


def _source_paragraphs(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        source = f.read()
    return [para for doc in _docstrings(source) for para in _paragraphs(doc)]


@lru_cache(maxsize=1)
def stdlib_docstring_splits() -> TextSplits:
    """Every usable docstring paragraph of ``STDLIB_MODULES``, split by text hash."""
    seen: set[str] = set()
    splits: dict[str, list[str]] = {"calibration": [], "train": [], "eval": []}
    for name in STDLIB_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            log.debug("stdlib module %s has no Python source here; skipped", name)
            continue
        for para in _source_paragraphs(spec.origin):
            if para not in seen:
                seen.add(para)
                splits[_split_of(para)].append(para)
    for texts in splits.values():
        texts.sort()
    return TextSplits(tuple(splits["calibration"]), tuple(splits["train"]), tuple(splits["eval"]))


@lru_cache(maxsize=1)
def python_reference_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the Python reference's ``help()`` topics, sorted; empty when this
    Python ships no ``pydoc_data`` (the file is parsed as a literal: nothing runs)."""
    spec = importlib.util.find_spec("pydoc_data")
    if spec is None or not spec.submodule_search_locations:
        return ()
    path = os.path.join(next(iter(spec.submodule_search_locations)), "topics.py")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return ()
    topics: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
    return tuple(sorted({p for text in topics.values() for p in _paragraphs(text)}))


_RST_MARKUP = re.compile(r"^(:|\.\.|\||\*\*Data Set Characteristics)")


@lru_cache(maxsize=1)
def dataset_description_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of scikit-learn's data set descriptions, sorted (field lists, directives
    and tables left out); empty when scikit-learn is not installed (found, never imported)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        return ()
    folder = os.path.join(os.path.dirname(spec.origin), "datasets", "descr")
    out: set[str] = set()
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".rst"):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                out.update(p for p in _paragraphs(f.read()) if not _RST_MARKUP.match(p))
    return tuple(sorted(out))


@lru_cache(maxsize=1)
def stdlib_wide_train() -> tuple[str, ...]:
    """Training paragraphs from every library source file of the stdlib, not only ``STDLIB_MODULES``.

    Distillation only needs inputs (the teacher makes the targets), and it overfits a few
    thousand texts. Only paragraphs whose hash puts them in the train split are taken, and
    none that is already in the fixed corpus: the calibration and held-out texts stay exactly
    those of ``stdlib_docstring_splits``, so fidelity figures stay comparable. On Python 3.11:
    3,548 + 2,756 texts (6,304). Test suites, demos and GUI packages are left out.
    """
    fixed = stdlib_docstring_splits()
    seen = set(fixed.calibration) | set(fixed.train) | set(fixed.eval)
    extra: list[str] = []
    root = sysconfig.get_paths()["stdlib"]
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(
            d for d in subfolders if d not in _NOT_LIBRARY and not d.startswith(("test", "config-"))
        )
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test"):
                continue
            for para in _source_paragraphs(os.path.join(folder, name)):
                if para not in seen:
                    seen.add(para)
                    if _split_of(para) == "train":
                        extra.append(para)
    return fixed.train + tuple(sorted(extra))


def train_texts(wide: bool) -> tuple[str, ...]:
    """The distillation texts: the fixed corpus's train split, or with ``wide`` the whole stdlib's."""
    return stdlib_wide_train() if wide else stdlib_docstring_splits().train


split_of = _split_of


def hashed_splits(texts: tuple[str, ...]) -> TextSplits:
    """``texts`` split by ``split_of`` (each list keeps the input's order)."""
    parts: dict[str, list[str]] = {"calibration": [], "train": [], "eval": []}
    for text in texts:
        parts[split_of(text)].append(text)
    return TextSplits(tuple(parts["calibration"]), tuple(parts["train"]), tuple(parts["eval"]))


def sample(texts: tuple[str, ...], n: int, seed: int) -> list[str]:
    """``n`` texts drawn without replacement by a seeded shuffle (all of them if fewer)."""
    import random

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:n]]


def length_grouped(texts: list[str], lengths: list[int], batch_size: int, seed: int) -> list[list[str]]:
    """``texts`` in batches of similar ``lengths`` (tokens), the batch order shuffled by ``seed``.

    Batches are padded to their longest text, and a docstring corpus mixes 10-token lines with
    128-token paragraphs: mixed batches spend most of a training step on padding. Sorting by
    length first makes each batch nearly pad-free (3,548 training texts, max_length 128, batches
    of 32: 1,019 tokens per batch instead of 3,370, for 1,003 real ones), and the shuffle keeps
    lengths from following the step count.
    """
    import random

    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = [[texts[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


# public name of the split rule, for user data (compressor.sources) to share it
split_of = _split_of
