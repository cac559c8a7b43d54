"""Checkpoint / resume of distill_: an interrupted run resumes without losing or repeating a step."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import compressor.distill.loop as distill_mod
from compressor.adapters.hf_encoder import HFEncoderAdapter
from compressor.config import from_dict
from compressor.distill.checkpoint import CheckpointError
from compressor.distill.config import RecoverConfig
from compressor.distill.loop import distill_
from compressor.errors import RecipeError
from compressor.passes.sparsity.sparsify import apply_mask_, is_24_sparse, mask_24_by_magnitude

REAL_LOSS = distill_mod.distill_loss
CFG = RecoverConfig(steps=10, lr=1e-3, warmup_steps=2, checkpoint_every=4)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tiny_bert_dir: Path, tiny_data_spec) -> tuple[Any, nn.Module, nn.Module, list[Any]]:
    """(adapter, 2:4-masked student, dense teacher, 4 training batches)."""
    adapter = HFEncoderAdapter()
    teacher = adapter.load(str(tiny_bert_dir))
    batches = adapter.make_data(tiny_data_spec, seed=0).train
    student = copy.deepcopy(teacher)
    for name, m in student.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("encoder."):
            apply_mask_(m, mask_24_by_magnitude(m.weight))
    return adapter, student, teacher, batches


def _count_steps(monkeypatch: pytest.MonkeyPatch, raise_at: int | None = None) -> list[int]:
    """Count loss evaluations (one per step); raise Interrupt on evaluation ``raise_at``."""
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        if raise_at is not None and len(calls) == raise_at:
            raise Interrupt
        calls.append(1)
        return REAL_LOSS(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "distill_loss", counted)
    return calls


def _reference(setup, tmp_path: Path) -> tuple[nn.Module, list[float]]:
    adapter, student0, teacher, batches = setup
    s = copy.deepcopy(student0)
    return s, distill_(s, teacher, adapter, batches, CFG, work_dir=tmp_path / "ref")


def test_interrupted_run_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch) -> None:
    adapter, student0, teacher, batches = setup
    ref, ref_losses = _reference(setup, tmp_path)

    # run 2: dies during step 7 (0-based 6): the last checkpoint is after step 4
    calls = _count_steps(monkeypatch, raise_at=6)
    with pytest.raises(Interrupt):
        distill_(copy.deepcopy(student0), teacher, adapter, batches, CFG, work_dir=tmp_path / "run")
    ckpts = list((tmp_path / "run").glob("distill-*.pt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=True)["step"] == 4

    # run 3: a fresh process starts from the same student and resumes at step 4
    calls = _count_steps(monkeypatch)
    resumed = copy.deepcopy(student0)
    losses = distill_(resumed, teacher, adapter, batches, CFG, work_dir=tmp_path / "run")
    assert len(calls) == CFG.steps - 4  # no step lost, none repeated
    assert len(losses) == CFG.steps
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-6
    ref_state = ref.state_dict()
    for k, v in resumed.state_dict().items():
        assert (v - ref_state[k]).abs().max().item() <= 1e-6, k
    assert any(not torch.equal(v, student0.state_dict()[k]) for k, v in ref_state.items())  # it trained
    for name, m in resumed.named_modules():
        mask = getattr(m, "weight_mask", None)
        if mask is not None:
            assert torch.equal(mask, dict(student0.named_modules())[name].weight_mask), name
            assert is_24_sparse(m.weight), name  # the 2:4 pattern holds across the resume

    # run 4: the finished checkpoint is reused: no training, same result
    calls = _count_steps(monkeypatch)
    again = copy.deepcopy(student0)
    assert distill_(again, teacher, adapter, batches, CFG, work_dir=tmp_path / "run") == losses
    assert calls == []
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in again.state_dict().items())


def test_checkpoint_from_a_different_config_is_refused(setup, tmp_path) -> None:
    adapter, student0, teacher, batches = setup
    short = dataclasses.replace(CFG, steps=4, warmup_steps=1)
    distill_(copy.deepcopy(student0), teacher, adapter, batches, short, work_dir=tmp_path)
    changed = dataclasses.replace(short, lr=2e-3)
    with pytest.raises(
        CheckpointError, match=r"different run \(distillation config changed: lr: 0.001 -> 0.002\)"
    ):
        distill_(copy.deepcopy(student0), teacher, adapter, batches, changed, work_dir=tmp_path)
    # how often to save is not part of the run: changing it still resumes
    other_every = dataclasses.replace(short, checkpoint_every=2)
    assert (
        len(distill_(copy.deepcopy(student0), teacher, adapter, batches, other_every, work_dir=tmp_path)) == 4
    )


def test_corrupt_and_unsafe_checkpoints_give_clear_errors(setup, tmp_path) -> None:
    adapter, student0, teacher, batches = setup
    cfg = dataclasses.replace(CFG, steps=2, warmup_steps=1, checkpoint_every=1)
    distill_(copy.deepcopy(student0), teacher, adapter, batches, cfg, work_dir=tmp_path)
    (ckpt,) = tmp_path.glob("distill-*.pt")
    good = ckpt.read_bytes()

    ckpt.write_bytes(good[: len(good) // 2])  # truncated, as a full disk would leave it
    with pytest.raises(CheckpointError, match=r"not a readable distillation checkpoint.*delete it"):
        distill_(copy.deepcopy(student0), teacher, adapter, batches, cfg, work_dir=tmp_path)

    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    torch.save({"format": 1, "payload": Evil()}, ckpt)
    with pytest.raises(CheckpointError, match="not a readable distillation checkpoint"):
        distill_(copy.deepcopy(student0), teacher, adapter, batches, cfg, work_dir=tmp_path)
    assert not marker.exists()  # weights_only: the pickle's code never ran


def test_failed_write_leaves_the_previous_checkpoint_whole(setup, tmp_path, monkeypatch) -> None:
    adapter, student0, teacher, batches = setup
    cfg = dataclasses.replace(CFG, steps=4, warmup_steps=1, checkpoint_every=2)
    real_save = torch.save
    saves: list[int] = []

    def flaky_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint dies half-way through writing
            f.write(b"PK\x03\x04 half a zip")
            raise OSError("No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="No space left"):
        distill_(copy.deepcopy(student0), teacher, adapter, batches, cfg, work_dir=tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    (ckpt,) = tmp_path.glob("distill-*.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 2


def test_checkpoint_every_is_validated_and_needs_no_work_dir(setup, caplog) -> None:
    with pytest.raises(RecipeError, match=r"r.yaml: passes\[1\].checkpoint_every: -1 is negative"):
        from_dict(RecoverConfig, {"checkpoint_every": -1}, "r.yaml: passes[1]")
    assert from_dict(RecoverConfig, {}, "p").checkpoint_every == 0
    adapter, student0, teacher, batches = setup
    cfg = dataclasses.replace(CFG, steps=1, warmup_steps=1, checkpoint_every=1)
    assert len(distill_(copy.deepcopy(student0), teacher, adapter, batches, cfg)) == 1
    assert "no work dir" in caplog.text


def test_distill_pass_checkpoints_into_its_work_dir(setup, tmp_path) -> None:
    from compressor.adapters.base import DataSplits
    from compressor.passes.distill.distill import DistillPass
    from compressor.pipeline import PassContext
    from compressor.targets import get_target

    adapter, student0, teacher, batches = setup
    data = DataSplits(calibration=batches[:1], train=batches, eval=batches[:1])
    ctx = PassContext(
        target=get_target("cpu"), adapter=adapter, teacher=teacher, data=data, work_dir=tmp_path
    )
    DistillPass(dataclasses.replace(CFG, steps=2, warmup_steps=1, checkpoint_every=1)).run(
        copy.deepcopy(student0), ctx
    )
    (ckpt,) = tmp_path.glob("distill-*.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 2


def test_compile_with_work_dir_resumes_an_interrupted_distill(tiny_bert_dir, tmp_path, monkeypatch) -> None:
    import json

    import yaml

    from compressor.app.cli import main

    recipe = {
        "name": "tiny-resume",
        "target": "cpu",
        "model": {"source": str(tiny_bert_dir)},
        "data": {
            "calibration_samples": 8,
            "train_samples": 16,
            "eval_samples": 8,
            "max_length": 16,
            "batch_size": 8,
        },
        "passes": [
            {"pass": "sparsify", "targets": ["encoder.*"]},
            {"pass": "distill", "steps": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2},
        ],
        "exports": [],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def compile_(out: str, work: str) -> dict[str, Any]:
        args = [
            "compile",
            "--recipe",
            str(path),
            "--out",
            str(tmp_path / out),
            "--work-dir",
            str(tmp_path / work),
        ]
        assert main([*args, "--no-bench"]) == 0
        return json.loads((tmp_path / out / "manifest.json").read_text())["passes"][2]["details"]

    reference = compile_("ref", "ref-work")
    _count_steps(monkeypatch, raise_at=3)  # the compile dies in the distill pass, after one checkpoint
    with pytest.raises(Interrupt):
        compile_("b", "work")
    assert not (tmp_path / "b").exists()  # no half bundle
    (ckpt,) = (tmp_path / "work").glob("distill-*.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    calls = _count_steps(monkeypatch)
    resumed = compile_("b", "work")
    assert len(calls) == 2  # steps 3 and 4 only
    assert resumed == reference  # loss_first / loss_last / loss_tail_mean of the uninterrupted run


def test_teacher_cache_gives_the_same_run_with_one_teacher_forward_per_batch(setup) -> None:
    adapter, student0, teacher, batches = setup
    calls: list[int] = []
    hook = teacher.register_forward_hook(lambda *_: calls.append(1))
    runs = {}
    try:
        for mb in (0, 64):
            calls.clear()
            s = copy.deepcopy(student0)
            cfg = dataclasses.replace(CFG, checkpoint_every=0, teacher_cache_mb=mb)
            runs[mb] = (s, distill_(s, teacher, adapter, batches, cfg), len(calls))
    finally:
        hook.remove()
    (plain, plain_losses, plain_calls), (cached, cached_losses, cached_calls) = runs[0], runs[64]
    assert plain_calls == CFG.steps and cached_calls == len(batches) < CFG.steps
    assert cached_losses == plain_losses  # bit for bit: the teacher is deterministic in eval mode
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), name
