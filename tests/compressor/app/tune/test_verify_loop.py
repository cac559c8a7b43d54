"""The verification loop's decisions on measured outcomes (the compile and the timing faked):
a plan that meets the budget but runs slower than ORT fp32 is never chosen."""

from __future__ import annotations

from typing import Any

from compressor.app.tune.options import Budget, TuneOptions, TuneResult, Verification
from compressor.app.tune.search import Plan
from compressor.app.tune.verify import VerifySteps, slower_shapes


class FakeVerify(VerifySteps):
    """Measured outcomes per plan: (held-out fidelity, speed-up at the one shape)."""

    def __init__(self, outcomes: dict[str, tuple[float, float]], margin: float = 0.03) -> None:
        self.opts = TuneOptions(budget=Budget.parse("mean_cosine>=0.97"), batches=(8,), seq_len=16)
        self.outcomes, self.margin, self.notes = outcomes, margin, []
        self.stage = lambda msg: None

    def recipe_of(self, plan: Plan) -> dict[str, Any]:
        return {"plan": plan.structure}

    def verify(self, plan: Plan, work: Any) -> Verification:
        fid, speedup = self.outcomes[plan.structure]
        latency = {"8x16": {"ms": 1.0, "baseline_ms": speedup, "speedup": speedup}}
        slower = slower_shapes(plan, latency, self.margin)
        met = self.opts.budget.met_by(fid) and not slower
        return Verification(plan, fid, "", {}, latency, met, 0.0, slower)


def _plan(name: str, ms: float, fid: float) -> Plan:
    return Plan(name, {"a": "int8" if ms < 10 else "float"}, ms, fid, 10.0)


def _run(outcomes: dict[str, tuple[float, float]]) -> tuple[TuneResult, FakeVerify]:
    front = [_plan("float", 10.0, 1.0), _plan("mild", 8.0, 0.99), _plan("fast", 5.0, 0.975)]
    steps = FakeVerify(outcomes)
    result = TuneResult(steps.opts, None, False, {}, 0.03, [], [], front, front[-1], None)  # type: ignore[arg-type]
    steps.verify_loop(result, front, None)  # type: ignore[arg-type]
    return result, steps


def test_a_faithful_plan_that_runs_slower_than_float_is_stepped_back_from() -> None:
    result, steps = _run({"fast": (0.98, 0.90), "mild": (0.99, 1.2), "float": (1.0, 1.0)})
    assert result.chosen is not None and result.chosen.structure == "mild"
    assert [v.plan.structure for v in result.verifications] == ["fast", "mild"]
    assert result.verifications[0].slower_at == {"8x16": 0.90}
    assert "runs slower than ORT fp32 at 8x16 0.90x" in steps.notes[0]


def test_a_plan_inside_the_timing_noise_is_not_called_slower() -> None:
    result, steps = _run({"fast": (0.98, 0.98)})
    assert result.chosen is not None and result.chosen.structure == "fast"
    assert result.verifications[0].slower_at == {}
    assert "no measured speed-up" in steps.notes[-1]  # chosen, but said to gain nothing


def test_the_untouched_model_is_never_called_slower() -> None:
    latency = {"8x16": {"speedup": 0.9}}
    assert slower_shapes(Plan("original", {"a": "float"}, 10.0, 1.0, 10.0), latency, 0.03) == {}
    assert slower_shapes(Plan("original", {"a": "int8"}, 9.0, 0.99, 10.0), latency, 0.03) == {"8x16": 0.9}
    assert slower_shapes(Plan("5x1536", {"a": "float"}, 9.0, 0.99, 10.0), latency, 0.03) == {"8x16": 0.9}
