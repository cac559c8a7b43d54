"""Held-out text batches grouped by evaluation domain and by token length.

Fidelity is reported per group (``ModelAdapter.grouped_metrics``): per domain, so a model that
holds up on the text it was trained on but not on a domain it never saw shows it, and per
length bucket, so a drop on long inputs is not averaged away by the short ones. Each batch
holds texts of one domain and one bucket, sorted by length (little padding), so the groups
are sets of whole batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from compressor.adapters.base import Batch


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
        lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
        for lo, hi in buckets:
            chosen = sorted((n, t) for t, n in zip(texts, lengths) if lo <= n <= hi)
            for i in range(0, len(chosen), batch_size):
                idx = len(batches)
                batches.append(tokenize([t for _, t in chosen[i : i + batch_size]], max_length))
                groups.setdefault(domain_key(domain), []).append(idx)
                groups.setdefault(length_key(lo, hi), []).append(idx)
    return batches, groups
