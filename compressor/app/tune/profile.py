"""Engine profiles: every candidate layer form and block shape timed in the real engine.

A layer form is timed as a one-layer ONNX graph (our kernels' module, lowered by the
``onnx`` exporter's own path, so the graph is the one a bundle ships: ``MatMulInteger``
with uint8 activations for int8, ``MatMulNBits`` for int4, a masked ``MatMul`` for 2:4)
on the real input shape ``[batch, seq, in_features]``, in ONNX Runtime with the bundle's
thread count. Every form of one shape runs in one rotation with its float twin and a
second float copy, the control (``time_in_turns``); the ratio form / float is the median of
per-turn pairs, so it survives a noisy host, and the control's ratio is the noise floor. A block shape (the model pruned to a depth and FFN width) is timed as the whole
float model, in rotation with the unpruned one.

Timings are cached in one JSON file per host fingerprint (``fingerprint.HostFingerprint``)
under the cache folder: a second tune on the same host, engine and thread count reads
them back; a change in any of those starts a new file. Entries are keyed by what was
timed (shape, form, batch x sequence; a block by the model's layer shapes), so a tune of
another model on the same host reuses the shapes they share.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.app.tune.fingerprint import HostFingerprint
from compressor.app.tune.forms import FORMS, LayerForm

log = logging.getLogger(__name__)

PROFILE_VERSION = 1


def cache_dir() -> Path:
    """Where engine profiles are kept: ``$COMPRESSOR_CACHE/profiles`` or ``~/.cache/compressor/profiles``."""
    root = os.environ.get("COMPRESSOR_CACHE")
    base = (
        Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor"
    )
    return base / "profiles"


def linear_key(k: int, n: int, batch: int, seq: int) -> str:
    return f"{k}x{n}@{batch}x{seq}"


@dataclass
class EngineProfile:
    """Measured latencies on one host: ``linears[key][form]`` in ms (``float`` is the twin
    timed in the same rotation), ``blocks[key]`` the whole float model of one shape and the
    unpruned one beside it. ``estimated`` marks a profile computed from a roofline instead."""

    fingerprint: HostFingerprint
    linears: dict[str, dict[str, float]] = field(default_factory=dict)
    blocks: dict[str, dict[str, float]] = field(default_factory=dict)
    estimated: bool = False
    path: Path | None = None
    reused: int = 0  # entries found in the cache this run
    measured: int = 0  # entries timed this run

    def form_ms(self, k: int, n: int, batch: int, seq: int, form: str) -> float:
        return self.linears[linear_key(k, n, batch, seq)][form]

    def ratio(self, k: int, n: int, batch: int, seq: int, form: str) -> float:
        """``form``'s latency over float's: the median of the paired per-turn ratios."""
        row = self.linears[linear_key(k, n, batch, seq)]
        return row.get(f"{form}/ratio", row[form] / row["float"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "fingerprint": self.fingerprint.to_dict(),
            "estimated": self.estimated,
            "linears": self.linears,
            "blocks": self.blocks,
        }

    def save(self) -> None:
        """Write the profile next to its peers atomically (a crash never leaves half a cache)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".profile-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def load_profile(fingerprint: HostFingerprint, folder: Path | None = None) -> EngineProfile:
    """The cached profile of this fingerprint, or an empty one that will be saved there. A
    file that does not parse, or whose fingerprint differs from its name's, is ignored
    (logged) and replaced on save: a timing cache is never trusted past its key."""
    folder = folder if folder is not None else cache_dir()
    path = folder / f"{fingerprint.key}.json"
    prof = EngineProfile(fingerprint, path=path)
    if not path.is_file():
        return prof
    try:
        data = json.loads(path.read_text())
        ok = (
            data.get("version") == PROFILE_VERSION
            and data.get("fingerprint", {}).get("key") == fingerprint.key
        )
        if not ok:
            log.warning("%s: profile of another host or version; timing afresh", path)
            return prof
        prof.linears = {
            str(k): {str(f): float(v) for f, v in row.items()} for k, row in data["linears"].items()
        }
        prof.blocks = {
            str(k): {str(f): float(v) for f, v in row.items()} for k, row in data["blocks"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: unreadable profile (%s); timing afresh", path, e)
    return prof


# ---- timing in ONNX Runtime -------------------------------------------------------------------


def _ort_session(path: Path, threads: int):
    """A session that does not spin between runs: a rotation holds a dozen of them."""
    from compressor.exporters.onnx.onnx import ort_session

    return ort_session(path, threads, spinning=False)


def export_layer_onnx(module: nn.Module, in_features: int, path: Path) -> None:
    """``module`` (one layer) as ONNX through the ``onnx`` exporter's own lowering and rewrites."""
    from compressor.adapters.base import ExportSpec
    from compressor.exporters.onnx.onnx import export_onnx

    x = torch.randn(2, 8, in_features)
    spec = ExportSpec(
        module=module,
        example_inputs=(x,),
        input_names=("x",),
        output_names=("y",),
        dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
    )
    export_onnx(module, spec, path, 17)


def time_in_turns(
    runs: Mapping[str, Callable[[], Any]], warmup: int = 2, turns: int = 9, per_turn: int = 2
) -> dict[str, list[float]]:
    """Seconds per run of each of ``runs``, ``per_turn`` timed runs each per turn, the
    candidates in the same order every turn; ``times[name][t]`` is turn ``t``'s mean, so
    candidates can be compared turn by turn (a host that slows down slows one turn of all)."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(turns):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for _ in range(per_turn):
                fn()
            times[name].append((time.perf_counter() - t0) / per_turn)
    return times


def paired_summary(times: Mapping[str, list[float]], reference: str) -> dict[str, float]:
    """Each candidate's median ms and, under ``NAME/ratio``, the median over turns of its time
    divided by ``reference``'s in the same turn."""
    ref = np.array(times[reference])
    out: dict[str, float] = {}
    for name, t in times.items():
        out[name] = round(float(np.median(t)) * 1000.0, 4)
        out[f"{name}/ratio"] = round(float(np.median(np.array(t) / ref)), 4)
    return out


CONTROL = "float_twin"
"""A second copy of the float layer in every rotation: its ratio to float is the noise floor."""


def time_linear_forms(
    k: int,
    n: int,
    batch: int,
    seq: int,
    forms: Sequence[LayerForm],
    threads: int,
    warmup: int = 2,
    turns: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """A ``k -> n`` layer in each of ``forms``, in float, and in float again (``float_twin``,
    the control), on ``[batch, seq, k]`` inputs, in one rotation: median ms per form and
    ``FORM/ratio``, its paired ratio to float. Weights are random (timing does not depend on
    their values; 2:4 zeros are real zeros)."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(k, n)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
        base.bias.copy_(torch.randn(n, generator=g) * 0.02)
    x = torch.randn(batch, seq, k, generator=g)
    amax = x.abs().amax()
    names = ["float"] + [f.name for f in forms if not f.is_float]
    with tempfile.TemporaryDirectory(prefix="compressor-profile-") as tmp:
        sessions = {}
        for name in names:
            path = Path(tmp) / f"{name.replace(':', '_').replace('+', '_')}.onnx"
            module = FORMS[name].build(base, amax).eval()
            export_layer_onnx(module, k, path)
            sessions[name] = _ort_session(path, threads)
        sessions[CONTROL] = _ort_session(Path(tmp) / "float.onnx", threads)
        feed = {"x": x.numpy()}
        runs = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
        return paired_summary(time_in_turns(runs, warmup, turns), "float")


def profile_linears(
    profile: EngineProfile,
    shapes: Sequence[tuple[int, int]],
    io_shapes: Sequence[tuple[int, int]],
    forms_of: Callable[[int], Sequence[LayerForm]],
    on_step: Callable[[str], object] | None = None,
    timer: Callable[..., dict[str, float]] = time_linear_forms,
) -> None:
    """Fill ``profile.linears`` for every ``(in, out)`` of ``shapes`` at every ``(batch, seq)`` of
    ``io_shapes`` with the forms ``forms_of(in_features)``; entries already there (from the
    cache) with every asked form are reused, others timed. The profile is saved after each
    entry, so an interrupted tune keeps what it measured."""
    for k, n in dict.fromkeys(shapes):
        forms = list(forms_of(k))
        for b, s in io_shapes:
            key = linear_key(k, n, b, s)
            have = profile.linears.get(key, {})
            if "float" in have and all(f.name in have for f in forms):
                profile.reused += 1
                if on_step is not None:
                    on_step(f"reused {key}")
            else:
                if on_step is not None:
                    on_step(f"timing {key}: {', '.join(f.name for f in forms)}")
                profile.linears[key] = {
                    **have,
                    **_steady(timer, k, n, b, s, forms, profile.fingerprint.threads),
                }
                profile.measured += 1
                profile.save()


RETIME_NOISE = 0.04
"""A rotation whose float twin strays more than this from float is timed again (once)."""


def _steady(timer: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    """``timer(*args)``, repeated once when its control says the host was noisy during it;
    the rotation whose control strayed least is kept."""
    best = timer(*args)
    if abs(best.get(f"{CONTROL}/ratio", 1.0) - 1.0) > RETIME_NOISE:
        again = timer(*args)
        if abs(again.get(f"{CONTROL}/ratio", 1.0) - 1.0) < abs(best[f"{CONTROL}/ratio"] - 1.0):
            best = again
    return best


def block_key(signature: str, batch: int, seq: int) -> str:
    return f"{signature}@{batch}x{seq}"


def model_signature(model: nn.Module, adapter_name: str) -> str:
    """What a whole-model timing depends on: the adapter and every Linear's name and shape (a
    pruned depth or width shows in them)."""
    import hashlib

    shapes = [
        f"{name}:{m.in_features}x{m.out_features}"
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    digest = hashlib.sha256("\n".join([adapter_name, *shapes]).encode()).hexdigest()[:16]
    return digest


def time_models_onnx(
    models: Mapping[str, Path],
    feed: Mapping[str, np.ndarray],
    threads: int,
    reference: str,
    warmup: int = 1,
    turns: int = 7,
) -> dict[str, float]:
    """Median ms of each ONNX file on ``feed`` and its paired ratio to ``reference``'s, timed
    in one rotation."""
    sessions = {k: _ort_session(p, threads) for k, p in models.items()}
    runs = {k: (lambda s=s: s.run(None, dict(feed))) for k, s in sessions.items()}
    return paired_summary(time_in_turns(runs, warmup, turns, per_turn=1), reference)
