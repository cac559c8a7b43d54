"""Real text that ships on every machine: docstrings of the Python standard library.

Calibration, distillation and evaluation need natural text, and a compiler must not
fetch data sets at run time. Every CPython install carries thousands of docstring
paragraphs written by people. They are read from the stdlib *source files* with
``ast`` (nothing is imported, so no module runs), cleaned into prose paragraphs, and
assigned to a split by a hash of their text: the same paragraph always lands in the
same split, so held-out text stays held out across runs and Python versions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import re
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
        with open(spec.origin, encoding="utf-8", errors="replace") as f:
            source = f.read()
        for doc in _docstrings(source):
            for para in _paragraphs(doc):
                if para not in seen:
                    seen.add(para)
                    splits[_split_of(para)].append(para)
    for texts in splits.values():
        texts.sort()
    return TextSplits(tuple(splits["calibration"]), tuple(splits["train"]), tuple(splits["eval"]))


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
