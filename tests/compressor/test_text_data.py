"""The broad default text: domains, a whole domain held out, long inputs, per-group fidelity."""

from __future__ import annotations

import pytest

from compressor.data import dataset_description_paragraphs, python_reference_paragraphs, split_of
from compressor.recipe import DataSpec
from compressor.text_data import HELD_OUT_DOMAIN, held_out_texts, text_data


def test_the_broad_corpus_has_its_domains() -> None:
    reference = python_reference_paragraphs()
    described = dataset_description_paragraphs()
    assert len(reference) > 500 and len(described) > 50
    assert not set(reference) & set(described)
    assert all(not p.startswith((":", "..")) for p in described)  # field lists and directives left out


def test_no_held_out_text_is_calibrated_or_trained_on_not_even_inside_a_long_text() -> None:
    spec = DataSpec(calibration_samples=200, train_samples=2000, eval_samples=100, long_fraction=0.5)
    data = text_data(spec, seed=0, max_length=256)
    assert set(data.eval) == {"python-docstrings", "python-reference", HELD_OUT_DOMAIN}
    assert data.held_out_domains == (HELD_OUT_DOMAIN,)
    seen = data.calibration + data.train
    held_out_whole = dataset_description_paragraphs()
    for para in held_out_whole:
        assert not any(para in text for text in seen), para[:60]
    # the other domains' held-out paragraphs (their eval hash split) never reach calibration / training
    for text in seen:
        assert split_of(text) != "eval" or len(text) > 700  # a long text's own hash means nothing
    singles = [t for t in seen if len(t) <= 700]
    assert all(split_of(t) != "eval" for t in singles)
    reference_eval = [p for p in python_reference_paragraphs() if split_of(p) == "eval"]
    assert not any(p in text for p in reference_eval[:200] for text in seen)


def test_calibration_mixes_the_domains_and_long_texts_reach_the_serving_length() -> None:
    spec = DataSpec(calibration_samples=64, train_samples=0, eval_samples=40)
    data = text_data(spec, seed=0, max_length=256)
    reference = set(python_reference_paragraphs())
    from_reference = sum(t in reference for t in data.calibration)
    assert 16 <= from_reference <= 48, from_reference  # taken in turn, not one domain first
    long_texts = [t for t in data.calibration if len(t) >= 256 * 4]
    assert 8 <= len(long_texts) <= 24, len(long_texts)  # long_fraction 0.25 of 64, in turn from each domain
    short = text_data(spec, seed=0, max_length=128)
    assert not [t for t in short.calibration if len(t) >= 1024]  # 128 tokens: no joined texts


def test_text_data_is_deterministic_and_held_out_texts_mix_domains() -> None:
    spec = DataSpec(calibration_samples=32, train_samples=64, eval_samples=32)
    assert text_data(spec, 3, 256) == text_data(spec, 3, 256)
    mixed = held_out_texts(30, 0, 128)
    assert any(t in set(dataset_description_paragraphs()) for t in mixed)
    assert any(t in set(python_reference_paragraphs()) for t in mixed)


def test_fidelity_is_reported_per_domain_and_length_and_the_gate_judges_the_worst_domain(
    tiny_bert_dir,
) -> None:
    import copy

    import torch

    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.errors import PassError
    from compressor.fidelity import fidelity_gate
    from compressor.recipe import EvaluationSpec

    adapter = HFEncoderAdapter()
    model = adapter.load(str(tiny_bert_dir))
    spec = DataSpec(calibration_samples=8, train_samples=0, eval_samples=24, batch_size=16)
    data = adapter.make_data(spec, seed=0)
    assert {"domain=python-docstrings", "domain=python-reference", f"domain={HELD_OUT_DOMAIN}"} <= set(
        data.eval_groups
    )
    assert data.info["max_length"] == 128  # the tiny model's position table: its serving length
    assert "len=65-128" in data.eval_groups and "len=1-64" in data.eval_groups
    for group in (g for g in data.eval_groups if g.startswith("len=")):
        lo, hi = (int(x) for x in group[4:].split("-"))
        for i in data.eval_groups[group]:
            lengths = data.eval[i]["attention_mask"].sum(dim=1)
            assert int(lengths.min()) >= lo and int(lengths.max()) <= hi
    student = copy.deepcopy(model)
    with torch.no_grad():  # hurt only what long inputs reach: the last position embeddings
        rows = student.embeddings.position_embeddings.weight[65:]
        rows += torch.randn(rows.shape, generator=torch.Generator().manual_seed(0))
    metrics = adapter.grouped_metrics(student, model, data.eval, data.eval_groups)
    assert metrics["mean_cosine@len=1-64"] > 0.9999
    assert metrics["mean_cosine@len=65-128"] < 0.99
    per_domain = {k: v for k, v in metrics.items() if k.startswith("mean_cosine@domain=")}
    assert len(per_domain) == 3
    worst = min(per_domain.values())
    assert worst < metrics["mean_cosine"]  # the worst domain sits below the pooled mean
    limit = (worst + metrics["mean_cosine"]) / 2  # the pooled mean passes, the worst domain does not
    with pytest.raises(PassError, match=r"on its worst evaluation domain \("):
        fidelity_gate(EvaluationSpec(min_mean_cosine=limit), adapter, metrics)
    fidelity_gate(EvaluationSpec(min_mean_cosine=worst - 1e-6), adapter, metrics)


def test_a_max_length_past_the_models_positions_is_refused(tiny_bert_dir) -> None:
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.errors import DataError

    adapter = HFEncoderAdapter()
    adapter.load(str(tiny_bert_dir))
    with pytest.raises(DataError, match=r"data\.max_length 256 is past the model's 128 positions"):
        adapter.make_data(DataSpec(calibration_samples=4, train_samples=0, eval_samples=4, max_length=256), 0)
