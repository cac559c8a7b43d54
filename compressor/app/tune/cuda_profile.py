"""The GPU measurement backend: layer forms and whole models timed on a CUDA device.

When the target is a GPU and a CUDA device of the target's architecture is on this host,
the tuner times the forms the GPU bundle runs instead of estimating them: float as fp16
``F.linear`` (cuBLAS), int8 through ``Int8Linear``'s Triton W8A8 path, int4 through
``Int4Linear``'s W4A16 kernel, in fp16 activations, each in the same rotation as its
float twin (``profile.time_in_turns`` with a device synchronise per run). TensorRT is not
used here (it is not installed on the machines we measure on); the plans say so in
their fingerprint's engine field.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compressor.app.tune.fingerprint import HostFingerprint, cpu_fingerprint
from compressor.app.tune.forms import FORMS, LayerForm
from compressor.app.tune.profile import CONTROL, paired_summary, time_in_turns
from compressor.targets import Target


def cuda_matches(target: Target) -> bool:
    """A CUDA device of ``target``'s compute capability is present."""
    if target.device != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(0) == target.compute_capability


def cuda_fingerprint() -> HostFingerprint:
    cpu = cpu_fingerprint(1)
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    engine = f"torch {torch.__version__} + triton kernels (cuda {torch.version.cuda})"
    return HostFingerprint(
        cpu=cpu.cpu, isa=cpu.isa, engine=engine, threads=0, device=f"{name} sm_{major}{minor}"
    )


def _synced(fn: Any) -> Any:
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


@torch.no_grad()
def time_linear_forms_cuda(
    k: int, n: int, batch: int, seq: int, forms: Sequence[LayerForm], threads: int = 0, turns: int = 15
) -> dict[str, float]:
    """Like ``profile.time_linear_forms``, on the GPU in fp16 activations."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(k, n)
    base.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
    x = torch.randn(batch, seq, k, generator=g)
    amax = x.abs().amax()
    xs = x.cuda().half()
    runs = {}
    for name in ["float", CONTROL] + [f.name for f in forms if not f.is_float]:
        form = FORMS["float" if name == CONTROL else name]
        module = form.build(base, amax).eval().cuda()
        if name in ("float", CONTROL, "2:4"):
            module = module.half()
        runs[name] = _synced(lambda m=module: m(xs))
    return paired_summary(time_in_turns(runs, warmup=3, turns=turns, per_turn=5), "float")


@torch.no_grad()
def time_models_cuda(
    models: Mapping[str, nn.Module], feed: Mapping[str, torch.Tensor], reference: str
) -> dict[str, float]:
    """Whole float models in fp16 on the GPU, in one rotation, with paired ratios to ``reference``."""
    inputs = {k: v.cuda() for k, v in feed.items()}
    runs = {}
    for name, m in models.items():
        gpu = copy.deepcopy(m).half().cuda().eval()  # the tuner's own models stay on the CPU in fp32
        runs[name] = _synced(lambda g=gpu: g(**inputs))
    return paired_summary(time_in_turns(runs, warmup=2, turns=9, per_turn=3), reference)
