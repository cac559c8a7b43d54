"""The tuner's verification: the chosen plan compiled as its recipe, judged and timed whole.

The plan runs as the recipe it becomes (full recovery, SmoothQuant's alpha search, QAD),
in memory on the tuner's model, data and teacher; its held-out fidelity is judged as the
recipe's floor judges it (the worst evaluation domain) and its ONNX export is timed beside
the original's plain fp32 export, as ``compressor bench`` times them. A plan that misses
moves the choice back along the front by what it was short.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compressor.app.tune.options import ORIGINAL, TuneResult, Verification
from compressor.app.tune.search import (
    Plan,
    choose,
    step_back,
)
from compressor.app.tune.state import TunerState
from compressor.recipe import parse_recipe

log = logging.getLogger(__name__)


def slower_shapes(plan: Plan, latency: dict[str, dict[str, float]], margin: float) -> dict[str, float]:
    """Never slower: the declared shapes where a compressed plan's whole model measured slower
    than ORT fp32 beyond the noise ``margin`` (shape -> speed-up). The untouched model (the
    original structure, every layer float) is the baseline itself: its ratio is only noise."""
    if plan.structure == ORIGINAL and set(plan.forms.values()) <= {"float"}:
        return {}
    return {k: d["speedup"] for k, d in latency.items() if d["speedup"] < 1.0 - margin}


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.5f}"


class VerifySteps(TunerState):
    """The verifying half of ``Tuner`` (the attributes are the tuner's)."""

    def recipe_of(self, plan: Plan) -> dict[str, Any]:
        raise NotImplementedError  # Tuner's

    def verify_loop(self, result: TuneResult, front: Sequence[Plan], work: Path) -> None:
        plan = result.chosen
        margin = 0.0
        while plan is not None and len(result.verifications) < self.opts.max_verify:
            self.stage(
                f"verify: compiling the plan ({plan.structure}, {plan.counts()}) with its full recovery"
            )
            v = self.verify(plan, work)
            result.verifications.append(v)
            if v.met:
                result.chosen = plan
                result.recipe = self.recipe_of(plan)
                if v.latency and all(d["speedup"] < 1.0 + self.margin for d in v.latency.values()):
                    self.notes.append(
                        f"the verified plan is within the timing noise ({self.margin:.3f}) of ORT fp32 at every "
                        "shape: no measured speed-up on this engine at these shapes"
                    )
                return
            if v.slower_at and self.opts.budget.met_by(v.fidelity):
                # never slower: the whole model runs slower than ORT fp32 somewhere; a plan with
                # fewer compressed layers is the way back
                nxt = step_back(front, plan)
                slow = ", ".join(f"{k} {x:.2f}x" for k, x in v.slower_at.items())
                self.notes.append(
                    f"plan {plan.structure} {plan.counts()} meets {self.opts.budget.text} but runs slower than "
                    f"ORT fp32 at {slow}: "
                    + ("stepping back along the front" if nxt is not None else "no plan left on the front")
                )
                plan = nxt
                continue
            # the estimate was this much too high: ask the front for that much more. The plan it
            # gives is more faithful than this one (budget + margin > plan.fidelity), so never one
            # tried before; without one, the next plan toward fidelity
            budget = self.opts.budget
            judged = budget.score(v.fidelity) if v.fidelity is not None else budget.floor - 1.0
            margin = max(margin, plan.fidelity - judged)
            nxt = choose(front, budget.floor + margin) or step_back(front, plan)
            self.notes.append(
                f"plan {plan.structure} {plan.counts()} measured {budget.metric} {_fmt(v.fidelity)}{v.where}, missing "
                f"{budget.text}: "
                + ("stepping back along the front" if nxt is not None else "no plan left on the front")
            )
            plan = nxt
        result.chosen, result.recipe = None, None  # no verified plan met the budget

    def verify(self, plan: Plan, work: Path) -> Verification:
        from compressor.app.compile import apply_recipe
        from compressor.fidelity import gates
        from compressor.recipe import EvaluationSpec

        t = time.monotonic()
        recipe_dict = self.recipe_of(plan)
        recipe_dict["evaluation"] = {**recipe_dict["evaluation"], "run_bench": False}
        budget = self.opts.budget
        recipe_dict["evaluation"].pop(budget.recipe_key, None)
        recipe = parse_recipe(recipe_dict, source=self.base.source)
        # the data the written recipe names, built as its compile will build it (a pruned plan
        # trains on more texts than the probes did): the verification is that compile
        data = self.data if recipe.data == self.base.data else None
        c = apply_recipe(
            recipe, self.adapter, work, self.progress, self.stage, model=copy.deepcopy(self.model),
            data=data, teacher=self.teacher,
        )  # fmt: skip
        metrics = {k: float(v) for k, v in c.metrics.items() if isinstance(v, int | float)}
        spec = (
            EvaluationSpec(min_mean_cosine=budget.value)
            if budget.recipe_key == "min_mean_cosine"
            else EvaluationSpec(headline_limit=budget.value)
        )
        gate = gates(spec, self.adapter)[0]
        value, where = gate.judged_value(metrics)
        path = self.export_onnx(c.model, work / f"verify-{len(plan.forms)}-{plan.structure}.onnx")
        latency = self.time_against_original(path, work)
        slower = slower_shapes(plan, latency, self.margin)
        met = budget.met_by(value) and not slower
        seconds = round(time.monotonic() - t, 1)
        return Verification(plan, value, where, metrics, latency, met, seconds, slower)

    def time_against_original(self, path: Path, work: Path) -> dict[str, dict[str, float]]:
        """The compiled model's ONNX beside the original's plain fp32 export, as ``compressor
        bench`` times them, at every declared shape."""
        from compressor.app.timing import time_onnx_against_fp32

        out = {}
        for b, s in self.opts.io_shapes:
            res = time_onnx_against_fp32(
                self.adapter, self.model, {"tuned": path}, work, b, s, self.opts.threads, warmup=2, repeats=10
            )
            base, tuned = res["ort_fp32"]["median_ms"], res["tuned"]["median_ms"]
            out[f"{b}x{s}"] = {"ms": tuned, "baseline_ms": base, "speedup": round(base / tuned, 3)}
        return out
