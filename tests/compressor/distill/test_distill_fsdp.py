"""distill_ with ``parallel: fsdp`` under torchrun: 2 CPU ranks (gloo) with the student sharded by
FSDP2 follow the single-process trajectory, and a run killed after a sharded checkpoint resumes
without losing or repeating a step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.distill.loop import distill_
from compressor.passes.sparsity.sparsify import is_24_sparse
from tests.helpers.tiny import LM_SPEC

WORKER = Path(__file__).with_name("fsdp_distill_worker.py")


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def _torchrun(model_dir: Path, out: Path, kill_after: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[3])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += [str(WORKER), str(model_dir), str(out / "batches.pt"), str(out), str(kill_after)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")
def test_fsdp_two_ranks_match_one_process_and_resume_after_a_kill(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from compressor.adapters.causal_lm import CausalLMAdapter
    from tests.compressor.distill.fsdp_distill_worker import CONFIG, build_student_and_teacher

    data_adapter = CausalLMAdapter()
    data_adapter.load(str(tiny_llama_dir))
    batches = data_adapter.make_data(LM_SPEC, seed=0).train  # 4 global batches of 8
    torch.save(batches, tmp_path / "batches.pt")

    # killed right after the step-3 checkpoint: rank 0's file names the complete shard folder
    killed = _torchrun(tiny_llama_dir, tmp_path, kill_after=3)
    assert killed.returncode != 0
    assert not list(tmp_path.glob("rank*.pt"))
    (pt,) = (tmp_path / "work").glob("distill-*.pt")
    meta = torch.load(pt, weights_only=True)
    assert meta["step"] == 3 and meta["shards"] == "step-3" and meta["student"] == {}
    assert (pt.with_suffix(".dcp") / "step-3" / ".metadata").is_file()

    resumed = _torchrun(tiny_llama_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for k in r0["state"]:  # both ranks gathered the same full weights
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == CONFIG.steps
    assert r0["steps_run"] == r1["steps_run"] == [3, 4, 5]  # resumed at step 3: none lost, none repeated
    assert r0["losses"][:3] == meta["losses"]
    assert [p.name for p in pt.with_suffix(".dcp").iterdir()] == ["step-6"]  # older shards removed

    # one process, uninterrupted, on the same global batches: the same trajectory
    torch.manual_seed(0)
    adapter, student, teacher = build_student_and_teacher(str(tiny_llama_dir))
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    losses = distill_(student, teacher, adapter, batches, CONFIG)
    for single, sharded in zip(losses, r0["losses"], strict=True):
        assert abs(single - sharded) <= 1e-5 * max(1.0, abs(single)), (losses, r0["losses"])
    moved = 0.0
    for k, v in student.state_dict().items():
        worst = (v - r0["state"][k]).abs().max().item()
        assert worst <= 1e-5, (k, worst)
        moved = max(moved, (v - initial[k]).abs().max().item())
    assert moved > 1e-4 and losses[-1] < losses[0]  # it trained: the comparison is not vacuous
    for name, m in student.named_modules():
        if getattr(m, "weight_mask", None) is not None:
            assert is_24_sparse(r0["state"][f"{name}.weight"]), name  # masks hold on the shards
    print(f"peak RSS per rank: {r0['peak_mb']:.0f} / {r1['peak_mb']:.0f} MB")
