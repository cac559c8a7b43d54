"""distill_ under torchrun: 2 CPU processes (gloo) follow the single-process trajectory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.distill.distributed import shard_batch
from compressor.distill.loop import distill_
from compressor.errors import DataError
from compressor.passes.sparsity.sparsify import is_24_sparse

WORKER = Path(__file__).with_name("ddp_distill_worker.py")


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def test_shard_batch_splits_like_distributed_sampler_without_padding() -> None:
    batch = {"x": torch.arange(10).reshape(5, 2), "scale": torch.tensor(3.0)}
    s0, s1 = shard_batch(batch, 0, 2), shard_batch(batch, 1, 2)
    assert s0["x"][:, 0].tolist() == [0, 4, 8] and s1["x"][:, 0].tolist() == [2, 6]
    assert s0["scale"] is batch["scale"]  # not a per-example tensor: every rank gets it whole
    with pytest.raises(DataError, match="batch of 5 examples cannot be split across 8 ranks"):
        shard_batch(batch, 0, 8)


@pytest.mark.slow
@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")
def test_two_ranks_match_one_process(tiny_bert_dir: Path, tiny_data_spec, tmp_path: Path) -> None:
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from tests.compressor.distill.ddp_distill_worker import CONFIG, build_student_and_teacher

    data_adapter = HFEncoderAdapter()
    data_adapter.load(str(tiny_bert_dir))
    batches = data_adapter.make_data(tiny_data_spec, seed=0).train  # 4 global batches of 8
    torch.save(batches, tmp_path / "batches.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[3])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [str(WORKER), str(tiny_bert_dir), str(tmp_path / "batches.pt"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2

    # both ranks end with identical weights and the same (all-reduced) loss curve
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["losses"] == r1["losses"]

    # only rank 0 wrote a checkpoint, and it is the finished run
    ckpts = list((tmp_path / "work").glob("distill-*.pt"))
    assert len(ckpts) == 1
    assert torch.load(ckpts[0], weights_only=True)["step"] == CONFIG.steps
    assert not list((tmp_path / "work").glob(".*.tmp"))

    # one process on the same global batches follows the same trajectory
    torch.manual_seed(0)
    adapter, student, teacher = build_student_and_teacher(str(tiny_bert_dir))
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    losses = distill_(student, teacher, adapter, batches, CONFIG)
    assert len(losses) == len(r0["losses"]) == CONFIG.steps
    for single, ddp in zip(losses, r0["losses"]):
        assert abs(single - ddp) <= 1e-5 * max(1.0, abs(single)), (losses, r0["losses"])
    moved = worst = 0.0
    for k, v in student.state_dict().items():
        worst = max(worst, (v - r0["state"][k]).abs().max().item())
        assert worst <= 1e-5, (k, worst)
        moved = max(moved, (v - initial[k]).abs().max().item())
    print(f"max |single - ddp| weight difference: {worst:.3g}; max weight change {moved:.3g}")
    assert moved > 1e-4  # training really changed the weights (the comparison is not vacuous)
    assert losses[-1] < losses[0]
    for name, m in student.named_modules():
        if getattr(m, "weight_mask", None) is not None:
            assert is_24_sparse(r0["state"][f"{name}.weight"]), name  # masks hold under DDP
