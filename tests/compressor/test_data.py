"""The text corpus: the fixed hash splits, and the wider training-only set beside them."""

from __future__ import annotations

from compressor.data import _split_of, stdlib_docstring_splits, stdlib_wide_train, train_texts


def test_wide_training_text_adds_only_train_split_paragraphs() -> None:
    fixed = stdlib_docstring_splits()
    wide = stdlib_wide_train()
    assert wide[: len(fixed.train)] == fixed.train  # the fixed training texts first, unchanged
    extra = wide[len(fixed.train) :]
    assert len(extra) > 1000, len(extra)  # the listed modules are a fraction of the stdlib
    assert len(set(wide)) == len(wide)
    held_out = set(fixed.eval) | set(fixed.calibration)
    assert not held_out & set(wide)
    assert all(_split_of(t) == "train" for t in extra)  # a held-out-hash paragraph never trains
    assert train_texts(wide=False) == fixed.train and train_texts(wide=True) == wide


def test_wide_train_reaches_the_adapters_training_batches(tiny_bert_dir) -> None:
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.recipe import DataSpec

    adapter = HFEncoderAdapter()
    adapter.load(str(tiny_bert_dir))
    spec = DataSpec(
        corpus="stdlib-docstrings",
        calibration_samples=8,
        train_samples=100_000,
        eval_samples=8,
        batch_size=64,
    )
    narrow = adapter.make_data(spec, seed=0)
    wide = adapter.make_data(DataSpec(**{**spec.__dict__, "wide_train": True}), seed=0)
    assert narrow.info["train"] == len(stdlib_docstring_splits().train)
    assert wide.info["train"] == len(stdlib_wide_train())
    assert sum(len(b["input_ids"]) for b in wide.train) == wide.info["train"]
    for a, b in zip(narrow.eval + narrow.calibration, wide.eval + wide.calibration):
        assert a["input_ids"].equal(b["input_ids"])  # calibration and held-out batches unchanged
