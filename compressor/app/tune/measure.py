"""The tuner's measurements: the model's structures and every layer form, timed in the engine.

The structures are the depth x FFN widths a ``prune`` can make (a grid around the model's
own); each is timed as a whole float model beside the original, and every Linear shape
they contain in every legal form (``profile``). ``reference_points`` places the shipped
hand-made recipes of the target on the same axes from the same profile.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.adapters.base import DataSplits, ModelAdapter
from compressor.app.timing import timing_inputs_of
from compressor.app.tune.fingerprint import HostFingerprint, cpu_fingerprint
from compressor.app.tune.forms import FORMS, legal_forms
from compressor.app.tune.options import ORIGINAL
from compressor.app.tune.profile import (
    CONTROL,
    EngineProfile,
    block_key,
    linear_key,
    load_profile,
    model_signature,
    profile_linears,
    time_linear_forms,
    time_models_onnx,
)
from compressor.app.tune.roofline import RooflineProfile
from compressor.app.tune.state import TunerState
from compressor.errors import CompressorError
from compressor.modules import get_linear
from compressor.progress import progress_bar
from compressor.recipe import Recipe, load_recipe
from compressor.targets import Target

log = logging.getLogger(__name__)

# ---- the model's structures ------------------------------------------------------------------


def _anatomy(model: nn.Module):
    from compressor.passes.prune.structure import describe_model

    try:
        return describe_model(model)
    except ValueError:
        return None


def structure_grid(model: nn.Module) -> list[tuple[int, int]]:
    """Depth x FFN width candidates: all, one and two layers fewer; the FFN at 1, 2/3 and 1/2
    of its width (multiples of 64)."""
    a = _anatomy(model)
    if a is None:
        return []
    L, F = a.num_layers, a.intermediate_size
    depths = [d for d in (L, L - 1, L - 2) if d >= 1]
    widths = sorted({F, *(max(64, int(round(F * r / 64)) * 64) for r in (2 / 3, 1 / 2))}, reverse=True)
    return [(d, w) for d in depths for w in widths]


def structure_name(layers: int, ffn: int) -> str:
    return f"{layers}x{ffn}"


def _ctx(target: Target, adapter: ModelAdapter, teacher: nn.Module, data: DataSplits, work: Path):
    from compressor.pipeline import PassContext

    return PassContext(target=target, adapter=adapter, teacher=teacher, data=data, seed=0, work_dir=work)


def prune_for_timing(model: nn.Module, layers: int, ffn: int, ctx: Any) -> nn.Module:
    """A copy of ``model`` at the shape (units chosen at random: timing does not care which)."""
    from compressor.passes.prune.config import StructuredPruneConfig
    from compressor.passes.prune.prune import StructuredPrunePass

    cfg = StructuredPruneConfig(layers=layers, ffn=ffn, importance="random", layer_importance="random")
    return StructuredPrunePass(cfg).run(copy.deepcopy(model), ctx).model


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ---- the tuner -------------------------------------------------------------------------------


class MeasureSteps(TunerState):
    """The measuring half of ``Tuner`` (the attributes are the tuner's)."""

    def fingerprint(self) -> HostFingerprint:
        if self.target.device == "cpu":
            return cpu_fingerprint(self.opts.threads)
        from compressor.app.tune.roofline import gpu_fingerprint

        return gpu_fingerprint(self.target)

    def _open_profile(self) -> tuple[EngineProfile, Any]:
        """The profile to fill and the layer timer: ONNX Runtime here for the CPU; the GPU
        itself when the target's is on this host; else the roofline, labelled estimated."""
        from compressor.app.tune.cuda_profile import cuda_fingerprint, cuda_matches, time_linear_forms_cuda

        if self.target.device == "cpu":
            return load_profile(self.fingerprint(), self.opts.cache), time_linear_forms
        if cuda_matches(self.target):
            self.on_gpu = True
            return load_profile(cuda_fingerprint(), self.opts.cache), time_linear_forms_cuda
        self.notes.append(
            f"target {self.target.name}: no {self.target.name} GPU on this host; every latency is a roofline "
            "estimate from the target record (estimated), not a measurement"
        )
        prof = RooflineProfile(self.fingerprint(), self.target)
        return prof, prof.time_forms

    def measure_profile(self, work: Path) -> tuple[EngineProfile, dict[str, nn.Module]]:
        """Time every structure and every Linear shape they contain; the structures' float
        models are returned (for their layer names and shapes)."""
        t = time.monotonic()
        opts = self.opts
        self.on_gpu = False
        prof, timer = self._open_profile()
        fp = prof.fingerprint
        ctx = _ctx(self.target, self.adapter, self.teacher, self.data, work)
        grid = list(opts.structures) if opts.structures is not None else structure_grid(self.model)
        a = _anatomy(self.model)
        shapes: dict[str, nn.Module] = {ORIGINAL: self.model}
        if a is not None:
            for layers, ffn in grid:
                if (layers, ffn) == (a.num_layers, a.intermediate_size):
                    continue
                shapes[structure_name(layers, ffn)] = prune_for_timing(self.model, layers, ffn, ctx)
        elif grid:
            self.notes.append(f"the {self.adapter.name} model has no prunable anatomy: no structures tried")
        self.stage(f"engine profile: {fp.describe()} ({'estimated' if prof.estimated else 'measured'})")
        self._profile_structures(prof, shapes, work)
        # each layer at the rows it sees at each declared shape, grouped by those rows
        by_rows: dict[tuple[int, int], set[tuple[int, int]]] = {}
        for m in shapes.values():
            for at in self.layer_rows(m).values():
                for k, n, rb, rs in at.values():
                    by_rows.setdefault((rb, rs), set()).add((k, n))
        total = sum(len(kn) for kn in by_rows.values())
        with progress_bar(self.progress, "tune: timing layer forms", total, "shape") as bar:
            for rows, kn in by_rows.items():
                profile_linears(
                    prof,
                    sorted(kn),
                    [rows],
                    lambda k: legal_forms(self.target, k, opts.forms),
                    on_step=lambda msg: bar.update(1),
                    timer=timer,
                )
        self._mark("profile", t)
        return prof, shapes

    def _profile_structures(self, prof: EngineProfile, shapes: Mapping[str, nn.Module], work: Path) -> None:
        """Whole float models of each shape, timed beside the original (reused from the cache)."""
        sig = {name: model_signature(m, self.adapter.name) for name, m in shapes.items()}
        self.signatures = sig
        original = sig[ORIGINAL]

        def key(name: str, b: int, s: int) -> str:
            return block_key(original if name == ORIGINAL else f"{sig[name]}/{original}", b, s)

        for b, s in self.opts.io_shapes:
            missing = [n for n in shapes if key(n, b, s) not in prof.blocks]
            if not missing:
                prof.reused += len(shapes)
                continue
            if isinstance(prof, RooflineProfile):
                for n, m in shapes.items():
                    prof.blocks[key(n, b, s)] = prof.estimate_model(m, self.model, b, s)
                continue
            inputs = timing_inputs_of(self.adapter, "tune")
            if self.on_gpu:
                from compressor.app.tune.cuda_profile import time_models_cuda

                self.stage(f"timing {len(shapes)} whole fp16 models at {b}x{s} on the GPU")
                res = time_models_cuda(shapes, inputs.timing(b, s), ORIGINAL)
            else:
                self.stage(f"timing {len(shapes)} whole float models at {b}x{s} in ONNX Runtime")
                files = {n: self.export_onnx(m, work / f"block-{n}.onnx") for n, m in shapes.items()}
                feed = {k: v.numpy() for k, v in inputs.timing(b, s).items()}
                res = time_models_onnx(files, feed, self.opts.threads, ORIGINAL)
            for n in shapes:
                prof.blocks[key(n, b, s)] = {"ms": res[n], "ratio": res[f"{n}/ratio"]}
            prof.measured += len(shapes)
            prof.save()

    def layer_rows(self, model: nn.Module) -> dict[str, dict[tuple[int, int], tuple[int, int, int, int]]]:
        """Per Linear a plan may change (the adapter's: a decoder's ``lm_head`` stays out, as
        the quantize pass leaves it), ``(in, out, b, s)`` at each declared shape: the input
        it really sees there, found by running the traced module on the timing inputs (a
        token layer's ``[batch, seq, in]``; a pooler's or a time embedding's ``[batch, in]``
        is ``(batch, 1)``; a UNet attention's ``[batch, h*w, in]``). Layers the traced
        graph never runs are left out: no latency they save is real."""
        # what the rows depend on: the Linears' names and shapes (a probed copy of a structure
        # shares its timing model's); an id() could be a freed model's
        key = model_signature(model, self.adapter.name)
        cache: dict[str, Any] = self.__dict__.setdefault("_rows", {})
        if key in cache:
            return cache[key]
        inputs = timing_inputs_of(self.adapter, "tune")
        names = set(self.adapter.linear_names(model))
        found: dict[str, dict[tuple[int, int], tuple[int, int, int, int]]] = {}
        spec = self.adapter.export_spec(model, inputs.example())
        for b, s in self.opts.io_shapes:
            feed = inputs.timing(b, s)
            seen: dict[str, tuple[int, ...]] = {}

            def record(name: str, seen: dict[str, tuple[int, ...]] = seen) -> Any:
                def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:  # None: output kept
                    seen.setdefault(name, tuple(args[0].shape))

                return hook

            hooks = [
                m.register_forward_hook(record(n))
                for n, m in model.named_modules()
                if n in names and isinstance(m, nn.Linear)
            ]
            try:
                with torch.no_grad():
                    spec.module(*[feed[k] for k in spec.input_names])
            finally:
                for h in hooks:
                    h.remove()
            for n, shape in seen.items():
                w = get_linear(model, n).weight
                lead = shape[:-1] or (1,)
                found.setdefault(n, {})[(b, s)] = (
                    int(w.shape[1]),
                    int(w.shape[0]),
                    lead[0],
                    math.prod(lead[1:]),
                )
        rows = {n: at for n, at in found.items() if len(at) == len(self.opts.io_shapes)}
        cache[key] = rows
        return rows

    def structure_ms(self, prof: EngineProfile, name: str) -> tuple[float, float]:
        """A structure's float latency at the primary shape, from the ratio to the original
        measured beside it, and the original's latency."""
        b, s = self.opts.primary
        sig = self.signatures
        original = prof.blocks[block_key(sig[ORIGINAL], b, s)]["ms"]
        if name == ORIGINAL:
            return original, original
        row = prof.blocks[block_key(f"{sig[name]}/{sig[ORIGINAL]}", b, s)]
        return original * row["ratio"], original

    # -- never slower --

    def noise_margin(self, prof: EngineProfile, shapes: Mapping[str, nn.Module]) -> float:
        """``min_gain``, or the noise floor when the float twins disagree by more (the median
        over the timed shapes of |float_twin / float - 1|)."""
        import statistics

        noise = []
        for m in shapes.values():
            for at in self.layer_rows(m).values():
                for k, n, b, s in at.values():
                    row = prof.linears.get(linear_key(k, n, b, s), {})
                    if f"{CONTROL}/ratio" in row:
                        noise.append(abs(row[f"{CONTROL}/ratio"] - 1.0))
        floor = statistics.median(noise) if noise else 0.0
        return round(max(self.opts.min_gain, floor), 4)

    def layer_ratios(self, prof: EngineProfile, model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for name, at in self.layer_rows(model).items():
            k = next(iter(at.values()))[0]
            forms = legal_forms(self.target, k, self.opts.forms)
            out[name] = {
                f.name: {f"{b}x{s}": prof.ratio(*at[(b, s)], f.name) for b, s in self.opts.io_shapes}
                for f in forms
            }
        return out

    def layer_noise(self, prof: EngineProfile, model: nn.Module) -> dict[str, dict[str, float]]:
        """Per layer and declared shape, the float twin's ratio to float in the layer's own
        rotation (where the profile has one): how noisy that layer's timing was."""
        out: dict[str, dict[str, float]] = {}
        for name, at in self.layer_rows(model).items():
            for (b, s), key in at.items():
                row = prof.linears.get(linear_key(*key), {})
                if f"{CONTROL}/ratio" in row:
                    out.setdefault(name, {})[f"{b}x{s}"] = row[f"{CONTROL}/ratio"]
        return out

    # -- fidelity --

    def reference_points(
        self, prof: EngineProfile, models: Mapping[str, nn.Module], baseline_ms: float
    ) -> list[dict[str, Any]]:
        """The shipped hand-made recipes of this target, placed on the same axes by the same
        profile (their latency predicted; their fidelity is what their own compile measured,
        not re-run here)."""
        from compressor.recipe import shipped_recipes

        out = []
        for name in shipped_recipes():
            try:
                r = load_recipe(name)
            except CompressorError:
                continue
            if r.target != self.target.name or r.model.source != self.base.model.source:
                continue
            out.append({"name": name, **self._predict_recipe(prof, r, models, baseline_ms)})
        return [r for r in out if r.get("latency_ms") is not None]

    def _predict_recipe(
        self, prof: EngineProfile, r: Recipe, models: Mapping[str, nn.Module], baseline_ms: float
    ) -> dict[str, Any]:
        shape = ORIGINAL
        forms = "int8"
        for p in r.passes:
            if p.name == "prune":
                a = _anatomy(self.model)
                if a is None:
                    return {}
                layers = p.config.layers if isinstance(p.config.layers, int) else a.num_layers
                ffn = p.config.ffn if isinstance(p.config.ffn, int) else a.intermediate_size
                shape = structure_name(layers, ffn)
            if p.name == "quantize":
                act = getattr(p.config, "activations", "")
                forms = next((f.name for f in FORMS.values() if f.int8_scheme == act), "int8")
        if shape not in self.signatures or shape not in models:
            return {}
        model = models[shape]
        rec: dict[str, Any] = next((x for x in self.structures if x["name"] == shape), {})
        costs = rec.get("costs", {})
        ms, _ = self.structure_ms(prof, shape)
        budget = self.opts.budget
        fidelity = (
            budget.score(float(rec["probe_fidelity"])) if "probe_fidelity" in rec else self.original_score
        )
        rows = self.layer_rows(model)
        selected = [n for n in rows if n in costs and forms in costs[n]]
        for n in selected:
            row = prof.linears.get(linear_key(*rows[n][self.opts.primary]), {})
            if f"{forms}/ratio" in row:
                ms += (row[f"{forms}/ratio"] - 1.0) * row["float"]
            fidelity -= costs[n][forms]
        return {
            "structure": shape,
            "form": forms,
            "latency_ms": round(ms, 3),
            "speedup": round(baseline_ms / ms, 3),
            "fidelity": round(budget.value_of(fidelity), 6),
            "note": f"every costed layer {forms}, predicted and estimated like the front (the recipe's float layers not modelled)",
        }
