"""Memory per rank of distillation: one process vs 2 ranks under DDP vs 2 ranks under FSDP2.

On the trained LM (``benchmarks/train_lm_teacher.py``): the student is the teacher with 2:4
masks on every decoder layer, distilled (KL + SquareHead) for ``--steps`` steps on global batches
of ``--batch`` held-out-free training texts of ``--length`` tokens. Each run records, per rank:

- the bytes of the training state it holds: the trained parameters, their gradients and the
  AdamW moments (the local shards under FSDP), measured after the last step;
- its peak resident memory (``ru_maxrss``), which also counts the Python and torch libraries,
  the activations and the whole models the pass keeps.

    python benchmarks/distill_memory.py [--model benchmarks/.cache/lm-teacher] [--out benchmarks/results/distill_memory.json]

Run as a worker by itself (``--worker MODE``) under ``torch.distributed.run``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _local_bytes(t: torch.Tensor) -> int:
    from compressor.distill.fsdp import local

    x = local(t)
    return x.numel() * x.element_size()


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from compressor.adapters.causal_lm import CausalLMAdapter
    from compressor.distill import loop
    from compressor.distill.config import DistillLossConfig, RecoverConfig
    from compressor.passes.sparsity.sparsify import apply_mask_, mask_24_by_magnitude
    from compressor.recipe import DataSpec

    state: dict[str, int] = {}
    step = loop._step

    def measured(run, index):  # type: ignore[no-untyped-def]
        out = step(run, index)
        state["params"] = sum(_local_bytes(p) for p in run.params)
        state["grads"] = sum(_local_bytes(p.grad) for p in run.params if p.grad is not None)
        state["optimizer"] = sum(
            _local_bytes(v) for s in run.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
        return out

    loop._step = measured  # type: ignore[assignment]
    torch.manual_seed(0)
    adapter = CausalLMAdapter()
    teacher = adapter.load(args.model)
    student = copy.deepcopy(teacher)
    for name, m in student.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("model.layers."):
            apply_mask_(m, mask_24_by_magnitude(m.weight))
    spec = DataSpec(corpus="broad-text", calibration_samples=8, train_samples=args.batch * args.steps,
                    eval_samples=8, max_length=args.length, batch_size=args.batch)  # fmt: skip
    batches = adapter.make_data(spec, 0).train
    cfg = RecoverConfig(steps=args.steps, lr=1e-4, warmup_steps=1, parallel=args.worker if args.worker != "single" else "ddp",
                        loss=DistillLossConfig(output="kl"), teacher_cache_mb=0)  # fmt: skip
    losses = loop.distill_(student, teacher, adapter, batches, cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    record = {"rank": rank, "mode": args.worker, "losses": losses, "state_bytes": state,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip
    Path(args.record).with_name(f"{Path(args.record).stem}-{args.worker}-{rank}.json").write_text(
        json.dumps(record)
    )
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "benchmarks" / ".cache" / "lm-teacher"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill_memory.json")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--worker", choices=["single", "ddp", "fsdp"])
    ap.add_argument("--record")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        record = str(Path(tmp) / "rec.json")
        common = [__file__, "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch),
                  "--length", str(args.length), "--record", record]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for mode in ("single", "ddp", "fsdp"):
            launch = [sys.executable] if mode == "single" else [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]  # fmt: skip
            done = subprocess.run(
                [*launch, *common, "--worker", mode], env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
            runs[mode] = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob(f"rec-{mode}-*.json"))]
    result = {
        "model": args.model, "steps": args.steps, "global_batch": args.batch, "length": args.length,
        "threads_per_rank": 1, "host": {"machine": platform.machine(), "processor": platform.processor()},
        "torch": torch.__version__, "runs": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for mode, ranks in runs.items():
        for r in ranks:
            mb = {k: round(v / 2**20, 1) for k, v in r["state_bytes"].items()}
            print(f"{mode:6s} rank {r['rank']}: state MiB {mb}, peak RSS {r['peak_rss_mb']} MB, "
                  f"last loss {r['losses'][-1]:.5f}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
