"""Held-out text batches grouped by evaluation domain and by token length.

Fidelity is reported per group (``ModelAdapter.grouped_metrics``): per domain, so a model that
holds up on the text it was trained on but not on a domain it never saw shows it, and per
length bucket, so a drop on long inputs is not averaged away by the short ones. Each batch
holds texts of one domain and one bucket, sorted by length (little padding), so the groups
are sets of whole batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor.adapters.base import Batch, DataSplits
from compressor.errors import DataError


def length_buckets(max_length: int) -> list[tuple[int, int]]:
    """Token-length buckets ``(lo, hi)`` up to ``max_length``: 1-64, 65-128, 129-256, ..."""
    out, lo, hi = [], 1, 64
    while lo <= max_length:
        out.append((lo, min(hi, max_length)))
        lo, hi = hi + 1, hi * 2
    return out


def domain_key(domain: str) -> str:
    return f"domain={domain}"


def length_key(lo: int, hi: int) -> str:
    return f"len={lo}-{hi}"


def grouped_eval_batches(
    tokenizer: Any,
    tokenize: Callable[[Sequence[str], int], Batch],
    evals: Mapping[str, Sequence[str]],
    batch_size: int,
    max_length: int,
) -> tuple[list[Batch], dict[str, list[int]]]:
    """The held-out ``evals`` (domain -> texts) as batches, and each group's batch indices."""
    batches: list[Batch] = []
    groups: dict[str, list[int]] = {}
    buckets = length_buckets(max_length)
    for domain, texts in evals.items():
        lengths = [
            len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        ]
        for lo, hi in buckets:
            chosen = sorted((n, t) for t, n in zip(texts, lengths) if lo <= n <= hi)
            for i in range(0, len(chosen), batch_size):
                idx = len(batches)
                batches.append(tokenize([t for _, t in chosen[i : i + batch_size]], max_length))
                groups.setdefault(domain_key(domain), []).append(idx)
                groups.setdefault(length_key(lo, hi), []).append(idx)
    return batches, groups


def train_text_groups(
    tokenizer: Any, texts: list[str], spec: Any, seed: int, max_length: int
) -> list[list[str]]:
    """The distillation texts in batches of ``spec.batch_size``: of similar token length
    (``spec.group_by_length``, see ``compressor.data.length_grouped``) or in sampled order."""
    from compressor.data import length_grouped

    bs = spec.batch_size
    if not spec.group_by_length or not texts:
        return [texts[i : i + bs] for i in range(0, len(texts), bs)]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return length_grouped(texts, [len(ids) for ids in enc["input_ids"]], bs, seed)


def serving_length_of(folder: Path | None, tokenizer: Any, max_positions: int | None) -> int | None:
    """The longest input a text model serves: ``sentence_bert_config.json``'s ``max_seq_length``
    in its folder, else the smaller of the tokenizer's ``model_max_length`` and ``max_positions``."""
    import json

    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        try:
            value = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
            if isinstance(value.get("max_seq_length"), int) and value["max_seq_length"] > 0:
                return int(value["max_seq_length"])
        except (OSError, ValueError, AttributeError):
            pass
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), max_positions) if n]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def text_splits(adapter: Any, spec: Any, seed: int) -> DataSplits:
    """A text adapter's batches for ``spec``: calibration, length-grouped training batches, and
    held-out batches grouped by domain and length (``compressor.text_data``)."""
    from compressor.text_data import text_data

    max_length = spec.max_length or adapter.serving_length() or 128
    positions = getattr(adapter, "max_positions", None)
    if positions and max_length > positions:
        raise DataError(
            f"data.max_length {max_length} is past the model's {positions} positions; "
            f"set it to {positions} or less (or leave it out: the model's serving length)"
        )
    texts = text_data(spec, seed, max_length)
    bs = spec.batch_size
    evals, groups = grouped_eval_batches(adapter.tokenizer, adapter.tokenize, texts.eval, bs, max_length)
    return DataSplits(
        calibration=[
            adapter.tokenize(texts.calibration[i : i + bs], max_length)
            for i in range(0, len(texts.calibration), bs)
        ],
        train=[
            adapter.tokenize(g, max_length)
            for g in train_text_groups(adapter.tokenizer, texts.train, spec, seed, max_length)
        ],
        eval=evals,
        info=texts.info,
        eval_groups=groups,
    )
