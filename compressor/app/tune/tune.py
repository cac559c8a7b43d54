"""`compressor tune`: the plan chosen per layer by latency measured on the target's engine.

1. **Profile** (``profile``): every block shape the model can be pruned to (depth x FFN
   width) timed as a whole float model, every Linear shape those contain timed in every
   legal form, in ONNX Runtime on this host at the declared batch x sequence shapes,
   each beside its float twin; cached by host fingerprint. A GPU target without its GPU
   here gets a roofline estimate instead (``roofline``), labelled ``estimated``.
2. **Never slower** (``search.drop_slower_forms``): a form the engine does not run faster
   than float at every declared shape is dropped, with its ratio, before anything else.
3. **Fidelity**: each pruned shape worth trying gets a short-recovery probe (prune +
   ``probe_steps`` of distillation), mildest first, stopping at the first that misses the
   budget; every kept form of every layer gets its one-layer cost on the calibration data
   (``sensitivity``).
4. **Search** (``search``): the Pareto front of predicted latency against estimated
   fidelity, per structure and merged; the fastest plan within the budget is chosen.
5. **Verify**: the plan is compiled as the recipe it becomes (full recovery, SmoothQuant,
   QAD), judged on the held-out data (worst domain) and timed as a whole model beside the
   original in the engine. A plan that misses the budget moves the choice back along the
   front by the fidelity it was short, and the report says so.

The held-out split judges only the verification: probes and costs are measured on the
calibration data, so a plan cannot buy speed by fitting the text that judges it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.adapters import make_adapter
from compressor.app.compile import frozen_copy
from compressor.app.defaults import default_recipe
from compressor.app.timing import timing_inputs_of
from compressor.app.tune.forms import FORMS
from compressor.app.tune.measure import MeasureSteps
from compressor.app.tune.options import BUDGETS, ORIGINAL, Budget, TuneOptions, TuneResult
from compressor.app.tune.plan_recipe import plan_recipe
from compressor.app.tune.profile import (
    EngineProfile,
)
from compressor.app.tune.search import (
    Choice,
    LayerOptions,
    Plan,
    Rejected,
    Structure,
    choose,
    drop_slower_forms,
    extrapolate_recovery,
    merge_fronts,
    pareto_front,
)
from compressor.app.tune.sensitivity import SensitivityProbe
from compressor.app.tune.verify import VerifySteps
from compressor.errors import CompressorError, RecipeError
from compressor.progress import ProgressSetting, progress_bar
from compressor.recipe import Recipe, load_recipe, parse_recipe
from compressor.targets import get_target

log = logging.getLogger(__name__)


class Tuner(MeasureSteps, VerifySteps):
    """One tune: holds the model, data and profile while the steps run."""

    structures: list[dict[str, Any]]  # one record per structure, for the report
    rejected: list[Rejected]
    models: dict[str, nn.Module]  # the searched structures' models (probed)
    baseline_ms: float

    def __init__(
        self, opts: TuneOptions, progress: ProgressSetting = False, stage: Callable[[str], None] = log.info
    ) -> None:
        self.opts = opts
        self.progress = progress
        self.stage = stage
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        base = load_recipe(opts.recipe or default_recipe(opts.target))
        base = base.with_target(opts.target)
        if opts.model:
            base = base.with_model(opts.model)
        self.base: Recipe = base
        self.target = get_target(opts.target)
        for f in opts.forms or ():
            if f not in FORMS:
                raise RecipeError(f"--forms: {f!r} is not one of {', '.join(FORMS)}")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def out_of_time(self) -> bool:
        return self.elapsed() > self.opts.time_limit_s

    def load(self) -> None:
        t = time.monotonic()
        recipe = self.base
        self.stage(f"loading {recipe.model.source} and building calibration / training / held-out data")
        self.adapter = make_adapter(recipe.model.adapter, recipe.model.source)
        headline = getattr(type(self.adapter), "headline", None)
        if headline is None or headline.key != self.opts.budget.metric:
            key = getattr(headline, "key", None)
            hint = (
                f'give --budget "{key}{BUDGETS[key][0]}VALUE"'
                if key in BUDGETS
                else "tune handles sentence encoders (mean_cosine), decoder LMs (perplexity_ratio) and "
                "diffusion denoisers (fd) so far"
            )
            raise CompressorError(
                f"tune: --budget {self.opts.budget.text} needs a model whose fidelity is {self.opts.budget.metric}; "
                f"the {self.adapter.name} adapter's is {key or 'not declared'}: {hint}"
            )
        if type(self.adapter).autoregressive:  # its serving shapes include decode steps
            self.opts = dataclasses.replace(self.opts, decode=True)
        if self.opts.budget.metric == "fd":  # a denoiser is timed by batch alone: "32x1" is batch 32
            self.opts = dataclasses.replace(self.opts, seq_len=1)
        torch.manual_seed(recipe.seed)
        self.model = self.adapter.load(recipe.model.source).eval()
        timing_inputs_of(self.adapter, "tune")  # refused here, before any data is built
        self.teacher = frozen_copy(self.model)
        self.data = self.adapter.make_data(recipe.data, recipe.seed)
        if self.opts.budget.metric == "fd" and not hasattr(self.adapter, "sample_images"):
            raise CompressorError(
                f"tune: the {self.adapter.name} adapter cannot sample images to judge an fd budget"
            )
        self.probe = SensitivityProbe(
            self.adapter,
            self.teacher,
            self.data.calibration[: self.opts.calibration_batches],
            self.opts.budget,
            samples=sum(len(next(iter(b.values()))) for b in self.data.calibration),
            held_out=self.data.eval,
        )
        self.original_score = self.probe.teacher_score
        self._mark("load", t)

    # -- profile --
    def probe_structure(self, layers: int, ffn: int, work: Path) -> tuple[nn.Module, float, dict[str, float]]:
        """Prune to the shape with activation importance and recover ``probe_steps`` in two
        halves, scoring the calibration fidelity after each; the fidelity the full recovery
        (``recover_steps``) should reach is extrapolated from the two
        (``search.extrapolate_recovery``). Returns the probed model, that estimate and the
        probe's own scores."""
        from compressor.api import compress

        half = max(1, self.opts.probe_steps // 2)
        recover = {"steps": half, "lr": 1.0e-3, "warmup_steps": max(1, half // 10)}
        prune = {"pass": "prune", "layers": layers, "ffn": ffn, "ffn_multiple_of": 64, "recover": recover}
        scores: dict[str, float] = {}
        model = copy.deepcopy(self.model)
        for i, passes in enumerate(([prune], [{"pass": "distill", **recover, "lr": 5.0e-4}])):
            c = compress(
                self._recipe(passes, f"probe-{layers}x{ffn}-{i}"), model=model, adapter=self.adapter,
                data=self.data, teacher=self.teacher, work_dir=work, progress=self.progress, measure=False,
            )  # fmt: skip
            model = c.model.eval()
            scores[f"after_{half * (i + 1)}_steps"] = self.probe.fidelity(model)
        f_half, f_full = scores[f"after_{half}_steps"], scores[f"after_{2 * half}_steps"]
        budget = self.opts.budget
        best = self.original_score
        estimate = extrapolate_recovery(f_half, f_full, 2 * half, self.opts.recover_steps, best)
        # a student that scores better than its teacher on the calibration text (a perplexity
        # ratio under 1 after recovery on similar text) is credited as the teacher, no more:
        # held-out text gives no such headroom to spend on the layers' costs
        estimate = min(estimate, best)
        return model, estimate, {k: round(budget.value_of(v), 6) for k, v in scores.items()}

    def _base_dict(self) -> dict[str, Any]:
        """The base recipe as a dict, its unset data options left out."""
        base = self.base.to_dict()
        base["data"] = {k: v for k, v in base["data"].items() if v is not None}
        return base

    def _recipe(self, passes: list[dict[str, Any]], name: str) -> Recipe:
        """A probe's recipe: the base's model, data and exports with ``passes``, unbenched."""
        base = self._base_dict()
        return parse_recipe(
            {
                "name": name,
                "description": name,
                "model": base["model"],
                "target": base["target"],
                "seed": base["seed"],
                "data": base["data"],
                "passes": passes,
                "exports": base["exports"],
                "evaluation": {"bench": base["evaluation"]["bench"], "run_bench": False},
            },
            source=self.base.source,
        )

    def structure_options(
        self,
        prof: EngineProfile,
        model: nn.Module,
        kept: Mapping[str, set[str]],
        costs: Mapping[str, Mapping[str, float]],
    ) -> tuple[LayerOptions, ...]:
        out = []
        for name, at in self.layer_rows(model).items():
            k, n, b, s = at[self.opts.primary]
            float_ms = prof.form_ms(k, n, b, s, "float")
            choices = [Choice("float", 0.0, 0.0)]
            for form in sorted(kept.get(name, set()) - {"float"}):
                if form not in costs.get(name, {}):
                    continue
                delta = (prof.ratio(k, n, b, s, form) - 1.0) * float_ms
                choices.append(Choice(form, delta, costs[name][form]))
            out.append(LayerOptions(name, tuple(choices)))
        return tuple(out)

    # -- run --

    def _fidelity_of(
        self, name: str, ms: float, rec: dict[str, Any], work: Path
    ) -> tuple[nn.Module, float] | None:
        """The structure's model and estimated fidelity (a probe for a pruned one), or None
        with ``rec["skipped"]`` saying why it is not searched."""
        opts, budget = self.opts, self.opts.budget
        if name == ORIGINAL:
            return self.model, self.original_score
        if ms > self.baseline_ms * (1.0 - self.margin):
            rec["skipped"] = "its float model is not faster than the original's beyond the noise floor"
            return None
        if self.out_of_time():
            rec["skipped"] = f"the time limit ({opts.time_limit_s:.0f} s) was spent"
            return None
        milder = [
            r
            for r in self.structures
            if "probe_fidelity" in r and not budget.met_by(r["probe_fidelity"]) and r["float_ms"] >= ms
        ]
        if milder:
            rec["skipped"] = (
                f"the milder {milder[0]['name']} probed at {milder[0]['probe_fidelity']:.5f}, beyond the budget"
            )
            return None
        layers, ffn = (int(x) for x in name.split("x"))
        self.stage(f"probe {name}: prune + {opts.probe_steps} recovery steps")
        tp = time.monotonic()
        model, fid, scores = self.probe_structure(layers, ffn, work)
        value = round(budget.value_of(fid), 6)
        rec.update(probe_seconds=round(time.monotonic() - tp, 1), probe=scores, probe_fidelity=value)
        self._prunes[name] = {"layers": layers, "ffn": ffn}
        if fid < budget.floor:
            rec["skipped"] = (
                f"probe {budget.metric} {value:.5f} (extrapolated to {opts.recover_steps} steps) misses {budget.text}"
            )
            return None
        return model, fid

    def _search_structure(self, prof: EngineProfile, name: str, work: Path) -> list[Plan]:
        """Probe, cost and search one structure; its front (empty when it is skipped)."""
        ms, _ = self.structure_ms(prof, name)
        rec: dict[str, Any] = {
            "name": name,
            "float_ms": round(ms, 3),
            "float_ratio": round(ms / self.baseline_ms, 4),
        }
        self.structures.append(rec)
        got = self._fidelity_of(name, ms, rec, work)
        if got is None:
            return []
        model, fid = got
        kept, rejected = drop_slower_forms(
            self.layer_ratios(prof, model), self.margin, self.layer_noise(prof, model)
        )
        seen = {(x.layer, x.form) for x in self.rejected}
        self.rejected.extend(r for r in rejected if (r.layer, r.form) not in seen)
        forms_of = {n: sorted(fs) for n, fs in kept.items()}
        total = sum(len(fs) - 1 for fs in forms_of.values())
        self.stage(f"{name}: costing {total} layer forms on the calibration data")
        with progress_bar(self.progress, f"tune: {name} layer costs", total, "eval") as bar:
            base_fid, costs, inert = self.probe.costs(model, forms_of, lambda d, n: bar.update(1))
        if inert:
            self.notes.append(
                f"{name}: {', '.join(inert)} change(s) no output under any form (not on the path to the output): left as they are"
            )
        rec["calibration_fidelity"] = round(self.opts.budget.value_of(base_fid), 6)
        rec["costs"] = {n: {f: round(c, 7) for f, c in cs.items()} for n, cs in costs.items()}
        st = Structure(name, ms, fid, self.structure_options(prof, model, kept, costs))
        front = pareto_front(st, self.baseline_ms, max_cost=max(0.0, fid - self.opts.budget.floor) + 0.01)
        rec["front_points"] = len(front)
        self.models[name] = model
        return front

    def run(self) -> TuneResult:
        self.load()
        opts = self.opts
        self.structures, self.rejected, self.models, self._prunes = [], [], {}, {}
        with tempfile.TemporaryDirectory(prefix="compressor-tune-") as tmp:
            work = Path(tmp)
            prof, shapes = self.measure_profile(work)
            self.margin = self.noise_margin(prof, shapes)
            _, self.baseline_ms = self.structure_ms(prof, ORIGINAL)
            t = time.monotonic()
            order = sorted(shapes, key=lambda n: -self.structure_ms(prof, n)[0])  # mildest (slowest) first
            front = merge_fronts([self._search_structure(prof, name, work) for name in order])
            self._mark("probes and costs", t)
            chosen = choose(front, opts.budget.floor)
            stats = {
                "measured": prof.measured,
                "reused": prof.reused,
                "file": str(prof.path) if prof.path else None,
            }
            result = TuneResult(
                opts, prof.fingerprint, prof.estimated, stats, self.margin, self.structures, self.rejected,
                front, chosen, None, timings=self.timings, notes=self.notes,
            )  # fmt: skip
            result.references = self.reference_points(prof, self.models, self.baseline_ms)
            if chosen is None:
                self.notes.append(f"no plan reaches {opts.budget.text} by the estimates")
            else:
                result.recipe = self.recipe_of(chosen)
                self.check_recipe(result.recipe)
                if opts.verify and not prof.estimated and not self.on_gpu:
                    self.verify_loop(result, front, work)
                elif opts.verify:
                    why = (
                        "the latencies are estimates and the engine is not on this host"
                        if prof.estimated
                        else "compile the recipe and time it with compressor bench BUNDLE --device cuda"
                    )
                    self.notes.append(f"not verified here: {why}")
                if set(chosen.forms.values()) == {"float"}:
                    self.notes.append(
                        "no compressed form pays on this engine at these shapes: every layer stays float"
                    )
        result.timings["total"] = round(self.elapsed(), 1)
        return result

    def check_recipe(self, recipe: dict[str, Any]) -> None:
        """The written recipe passes ``compressor compile``'s whole plan check (every pass and
        export on this model and target), or the tune fails here, before anything is written."""
        from compressor.app.compile import plan

        plan(parse_recipe(recipe, source=f"tune --out ({self.opts.name})"), self.adapter, self.model)

    def recipe_of(self, plan: Plan) -> dict[str, Any]:
        return plan_recipe(
            plan,
            self._prunes.get(plan.structure),
            self._base_dict(),
            name=self.opts.name,
            budget_key=self.opts.budget.recipe_key,
            budget_value=self.opts.budget.value,
            batches=self.opts.batches,
            seq_len=self.opts.seq_len,
            threads=self.opts.threads,
            recover_steps=self.opts.recover_steps,
            qad_steps=self.opts.qad_steps,
        )


def tune(
    opts: TuneOptions, progress: ProgressSetting = False, stage: Callable[[str], None] = log.info
) -> TuneResult:
    """Run the whole tune (profile, probes, costs, search, verification)."""
    return Tuner(opts, progress, stage).run()


__all__ = ["Budget", "TuneOptions", "TuneResult", "Tuner", "tune"]
