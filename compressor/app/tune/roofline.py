"""A roofline estimate for GPU targets whose GPU is not on this host: labelled ``estimated``.

Each layer form's time is ``max(flops / peak rate, bytes moved / memory bandwidth)`` plus
a launch overhead, with the target record's published peaks (``compressor.targets``):
float runs in fp16 on a GPU engine; int8 at the int8 tensor-core rate, per-token
activations reading the input once more for their row maxima; int4 weight-only at the
fp16 rate with a quarter of the weight bytes; 2:4 at the sparse rates. A whole model is
its Linears plus its attention products (``2 * 2 * batch * heads * seq^2 * head_dim``
flops in fp16). Every number here is a model of the hardware, not a measurement: the
tuner marks the profile, the report and the recipe's header ``estimated``, and does
not verify such a plan's latency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from compressor.app.tune.fingerprint import HostFingerprint
from compressor.app.tune.forms import LayerForm
from compressor.app.tune.profile import CONTROL, EngineProfile
from compressor.targets import Target

LAUNCH_US = 5.0  # per kernel


def gpu_fingerprint(target: Target) -> HostFingerprint:
    return HostFingerprint(
        cpu=target.description,
        isa=(),
        engine="roofline estimate (target record)",
        threads=0,
        device=target.name,
    )


def _rate(target: Target, precision: str, sparse: bool) -> float:
    """FLOP/s of ``precision`` (dense or 2:4) on ``target``, falling back to fp16's."""
    table = target.sparse_peak_tflops if sparse and target.sparse_24 else target.peak_tflops
    tflops = (
        table.get(precision) or target.peak_tflops.get(precision) or target.peak_tflops.get("fp16") or 1.0
    )
    return float(tflops) * 1e12


def linear_seconds(target: Target, form: LayerForm, m: int, k: int, n: int) -> float:
    """The roofline time of one ``[m, k] x [k, n]`` layer in ``form``."""
    flops = 2.0 * m * k * n
    name = form.name
    if name.startswith("int8") or name == "2:4+int8":
        rate = _rate(target, "int8", form.sparse24)
        w_bytes, a_bytes = 1.0, 1.0 + 2.0  # int8 weights; the fp16 input read to quantize, int8 written
        if name == "int8_per_token":
            a_bytes += 2.0  # a second read of the input for the row maxima
    elif name.startswith("int4"):
        rate = _rate(target, "fp16", False)
        w_bytes, a_bytes = 0.5 + 2.0 / max(1, form.group_size or 128), 2.0
    else:  # float (fp16 on a GPU engine) and 2:4
        rate = _rate(target, "fp16", form.sparse24)
        w_bytes, a_bytes = (2.0 * 0.5 + 0.25) if form.sparse24 else 2.0, 2.0
    moved = k * n * w_bytes + m * k * a_bytes + m * n * 2.0
    bandwidth = (target.memory_bandwidth_gbs or 1000.0) * 1e9
    return max(flops / rate, moved / bandwidth) + LAUNCH_US * 1e-6


class RooflineProfile(EngineProfile):
    """An ``EngineProfile`` filled by the roofline instead of the engine; never cached."""

    def __init__(self, fingerprint: HostFingerprint, target: Target) -> None:
        super().__init__(fingerprint, estimated=True, path=None)
        self.target = target

    def time_forms(
        self, k: int, n: int, b: int, s: int, forms: Sequence[LayerForm], threads: int
    ) -> dict[str, float]:
        from compressor.app.tune.forms import FORMS

        m = b * s
        fl = linear_seconds(self.target, FORMS["float"], m, k, n) * 1000.0
        out: dict[str, float] = {
            "float": round(fl, 6),
            "float/ratio": 1.0,
            CONTROL: round(fl, 6),
            f"{CONTROL}/ratio": 1.0,
        }
        for f in forms:
            ms = linear_seconds(self.target, f, m, k, n) * 1000.0
            out[f.name] = round(ms, 6)
            out[f"{f.name}/ratio"] = round(ms / fl, 6)
        return out

    def model_seconds(self, model: nn.Module, b: int, s: int) -> float:
        from compressor.app.tune.forms import FORMS

        total = 0.0
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                total += linear_seconds(self.target, FORMS["float"], b * s, mod.in_features, mod.out_features)
        cfg: Any = getattr(model, "config", None)
        layers = getattr(cfg, "num_hidden_layers", 0) or 0
        hidden = getattr(cfg, "hidden_size", 0) or 0
        total += layers * 2 * 2.0 * b * s * s * hidden / _rate(self.target, "fp16", False)
        return total

    def estimate_model(self, model: nn.Module, original: nn.Module, b: int, s: int) -> dict[str, float]:
        ms = self.model_seconds(model, b, s) * 1000.0
        return {"ms": round(ms, 6), "ratio": round(ms / (self.model_seconds(original, b, s) * 1000.0), 6)}
