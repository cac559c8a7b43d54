"""The texts a compile calibrates, trains and judges on, by split and by evaluation domain.

``text_data(spec, seed, max_length)`` turns a recipe's ``data:`` section into calibration
and training texts and, per evaluation domain, held-out texts:

- your own data (``data.source`` or per-split sources, ``compressor.sources``): one domain,
  ``source``, hash-split so the held-out examples are never calibrated or trained on;
- ``corpus: broad-text`` (the default): the docstrings and the reference prose, sampled in
  turn from each (so neither crowds out the other) for calibration and training, and judged
  per domain, with ``dataset-descriptions`` held out whole (``compressor.data``);
- ``corpus: stdlib-docstrings``: the docstrings alone, as before.

A share ``long_fraction`` of the calibration and held-out texts is long: consecutive texts of
one domain and split joined up to about the serving length, so the long inputs the model
serves are calibrated and judged, not only the one-paragraph ones. Distillation trains on the
single texts (a joined one costs a step several times over; measured 10 s a step for the
pruned MiniLM at 256 tokens on a contended 2-core AVX2 host). The long texts are built from the same
split's texts, so no held-out paragraph reaches calibration or training inside a long text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from compressor.data import (
    TextSplits,
    dataset_description_paragraphs,
    hashed_splits,
    python_reference_paragraphs,
    sample,
    stdlib_docstring_splits,
    train_texts,
)
from compressor.errors import DataError

HELD_OUT_DOMAIN = "dataset-descriptions"
CHARS_PER_TOKEN = 4  # English prose in a WordPiece / BPE vocabulary: about 4 characters a token


@dataclass(frozen=True)
class TextData:
    """Calibration and training texts, and held-out texts per evaluation domain."""

    calibration: list[str]
    train: list[str]
    eval: dict[str, list[str]]
    held_out_domains: tuple[str, ...] = ()  # domains no calibration or training text came from
    info: dict[str, Any] = field(default_factory=dict)


def _round_robin(pools: list[list[str]], n: int) -> list[str]:
    """Up to ``n`` texts taken in turn from each pool (each already in a seeded order)."""
    out: list[str] = []
    for i in range(max((len(p) for p in pools), default=0)):
        for pool in pools:
            if i < len(pool):
                out.append(pool[i])
                if len(out) == n:
                    return out
    return out


def _join_long(texts: tuple[str, ...], n: int, chars: int, seed: int) -> list[str]:
    """``n`` long texts, each consecutive texts of a seeded order joined until ``chars`` long."""
    if not texts or n <= 0:
        return []
    order = list(texts)
    random.Random(seed).shuffle(order)
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while len(out) < n and i < len(order) * 4:
        cur.append(order[i % len(order)])
        i += 1
        if sum(len(t) + 1 for t in cur) >= chars:
            out.append(" ".join(cur))
            cur = []
    return out


def _mixed(pool: tuple[str, ...], n: int, spec: Any, chars: int, seed: int) -> list[str]:
    """``min(n, len(pool))`` texts of ``pool``: ``long_fraction`` of them long ones (joined up to
    ``chars`` characters; none when ``chars`` is 0), the rest single texts."""
    n = min(n, len(pool))
    n_long = int(round(n * spec.long_fraction)) if chars > 0 else 0
    long_texts = _join_long(pool, n_long, chars, seed + 7)
    out = sample(pool, n - len(long_texts), seed) + long_texts
    random.Random(seed + 11).shuffle(out)
    return out


def _domains(spec: Any) -> dict[str, TextSplits]:
    if spec.corpus == "stdlib-docstrings":
        fixed = stdlib_docstring_splits()
        return {"python-docstrings": TextSplits(fixed.calibration, train_texts(spec.wide_train), fixed.eval)}
    if spec.corpus != "broad-text":
        raise DataError(
            f"data.corpus: {spec.corpus!r} is not text; text models need broad-text or stdlib-docstrings"
        )
    fixed = stdlib_docstring_splits()
    held_out = dataset_description_paragraphs()
    if not held_out:
        raise DataError(
            "data.corpus broad-text: scikit-learn's data set descriptions (its held-out domain) are missing; "
            "pip install scikit-learn, or set data.corpus: stdlib-docstrings"
        )
    return {
        "python-docstrings": TextSplits(fixed.calibration, train_texts(spec.wide_train), fixed.eval),
        "python-reference": hashed_splits(python_reference_paragraphs()),
        HELD_OUT_DOMAIN: TextSplits((), (), held_out),
    }


def text_data(spec: Any, seed: int, max_length: int) -> TextData:
    """The texts ``spec`` (a recipe's ``DataSpec``) asks for; ``max_length`` is the token length
    the texts are cut to (the long texts are built to about that length)."""
    from compressor.sources import user_text_splits

    chars = max_length * CHARS_PER_TOKEN if max_length > 128 else 0
    user = user_text_splits(spec)
    domains = {"source": user} if user is not None else _domains(spec)
    cal_pools = [_mixed(d.calibration, spec.calibration_samples, spec, chars, seed) for d in domains.values()]
    # distillation trains on single texts: a long joined one costs a step several times over
    # (attention and padding) and the fidelity figures are judged at every length anyway
    train_pools = [_mixed(d.train, spec.train_samples, spec, 0, seed + 1) for d in domains.values()]
    calibration = _round_robin(cal_pools, spec.calibration_samples)
    train = _round_robin(train_pools, spec.train_samples)
    evals = {name: _mixed(d.eval, spec.eval_samples, spec, chars, seed + 2) for name, d in domains.items()}
    if not calibration:
        raise DataError("data: no calibration text (the corpus is empty on this Python install)")
    for name, texts in evals.items():
        if not texts:
            raise DataError(f"data: the held-out split of domain {name!r} is empty; give more data")
    held_out = tuple(n for n, d in domains.items() if not d.calibration and not d.train)
    info = {
        "corpus": "source" if user is not None else spec.corpus,
        "calibration": len(calibration),
        "train": len(train),
        "eval": {n: len(t) for n, t in evals.items()},
        "held_out_domains": list(held_out),
        "max_length": max_length,
    }
    return TextData(calibration, train, evals, held_out, info)


def held_out_texts(n: int, seed: int, max_length: int, long_fraction: float = 0.25) -> list[str]:
    """``n`` held-out texts of the broad default, taken in turn from each domain (what
    ``compressor bench`` times and scores an encoder on: never calibrated or trained on)."""
    from types import SimpleNamespace

    spec = SimpleNamespace(corpus="broad-text", wide_train=False, long_fraction=long_fraction)
    chars = max_length * CHARS_PER_TOKEN if max_length > 128 else 0
    pools = [_mixed(d.eval, n, spec, chars, seed) for d in _domains(spec).values()]
    return _round_robin(pools, n)
