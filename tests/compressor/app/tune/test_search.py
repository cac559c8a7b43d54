"""The search on given latencies: the known optimum found, slower forms dropped, the front sound."""

from __future__ import annotations

import itertools
import math

import pytest

from compressor.app.tune.search import (
    Choice,
    LayerOptions,
    Plan,
    Structure,
    choose,
    drop_slower_forms,
    merge_fronts,
    pareto_front,
    step_back,
)


def _structure(
    layers: dict[str, dict[str, tuple[float, float]]], ms: float = 100.0, fidelity: float = 1.0
) -> Structure:
    """``layers[name][form] = (delta_ms, cost)``; float is added."""
    opts = tuple(
        LayerOptions(n, (Choice("float", 0.0, 0.0), *(Choice(f, d, c) for f, (d, c) in forms.items())))
        for n, forms in layers.items()
    )
    return Structure("s", ms, fidelity, opts)


def _brute_force(st: Structure, min_fidelity: float) -> float:
    best = float("inf")
    for combo in itertools.product(*(lay.choices for lay in st.layers)):
        cost = sum(c.cost for c in combo)
        if st.fidelity - cost >= min_fidelity - 1e-12:
            best = min(best, st.latency_ms + sum(c.delta_ms for c in combo))
    return best


def test_the_search_finds_the_known_optimum_of_a_fake_engine() -> None:
    # a greedy pick by speed-per-cost takes "a:int4" first (-30 ms for 0.006) and then cannot
    # afford both of b's and c's cheap int8s; the optimum is int8 on all three (-36 ms, 0.0045)
    st = _structure(
        {
            "a": {"int8": (-12.0, 0.0015), "int4": (-30.0, 0.006)},
            "b": {"int8": (-12.0, 0.0015), "int4": (-14.0, 0.004)},
            "c": {"int8": (-12.0, 0.0015)},
        }
    )
    front = pareto_front(st, baseline_ms=100.0, max_cost=0.02, resolution=1e-5)
    plan = choose(front, 1.0 - 0.005)
    assert plan is not None
    assert dict(plan.forms) == {"a": "int8", "b": "int8", "c": "int8"}
    assert plan.latency_ms == pytest.approx(64.0)
    assert plan.fidelity == pytest.approx(1.0 - 0.0045)
    assert plan.speedup == pytest.approx(100.0 / 64.0)
    for floor in (1.0, 0.999, 0.995, 0.993, 0.99, 0.98):
        got = choose(front, floor)
        assert got is not None
        assert got.latency_ms == pytest.approx(_brute_force(st, floor)), floor


def test_random_fake_engines_match_brute_force() -> None:
    import random

    rng = random.Random(0)
    for _ in range(20):
        layers = {
            f"l{i}": {
                f: (-rng.uniform(0.5, 10.0), round(rng.uniform(0.0, 0.004), 5))
                for f in rng.sample(["int8", "int8_per_token", "int4_g64"], rng.randint(1, 3))
            }
            for i in range(5)
        }
        st = _structure(layers, ms=60.0, fidelity=0.99)
        front = pareto_front(st, 80.0, max_cost=0.03, resolution=1e-5)
        for floor in (0.99, 0.987, 0.983, 0.975):
            got = choose(front, floor)
            assert got is not None
            assert got.latency_ms == pytest.approx(_brute_force(st, floor), abs=1e-9)


def test_front_is_monotone_and_starts_all_float() -> None:
    st = _structure({"a": {"int8": (-5.0, 0.001)}, "b": {"int8": (-3.0, 0.0005), "int4": (-6.0, 0.003)}})
    front = pareto_front(st, 100.0, max_cost=0.01)
    assert set(front[0].forms.values()) == {"float"}
    assert front[0].latency_ms == pytest.approx(100.0)
    for a, b in itertools.pairwise(front):
        assert b.latency_ms < a.latency_ms
        assert b.fidelity < a.fidelity


def test_a_form_slower_than_float_is_dropped_with_its_ratio() -> None:
    ratios = {
        "q": {
            "float": {"32x128": 1.0},
            "int8": {"32x128": 0.74, "1x128": 0.8},
            "2:4": {"32x128": 1.01, "1x128": 0.99},
        },
        "o": {
            "float": {"32x128": 1.0},
            "int4_g64": {"32x128": 0.9, "1x128": 1.12},
            "int8": {"32x128": 0.985},
        },
    }
    kept, rejected = drop_slower_forms(ratios, margin=0.03)
    assert kept == {"q": {"float", "int8"}, "o": {"float"}}
    why = {(r.layer, r.form): r for r in rejected}
    assert why[("q", "2:4")].ratio == pytest.approx(1.01)
    assert why[("q", "2:4")].shape == "32x128"
    assert "slower than float" in why[("q", "2:4")].why
    # int4 is faster at 32 but slower at batch 1: one declared shape is enough to drop it
    assert why[("o", "int4_g64")].shape == "1x128"
    assert why[("o", "int4_g64")].ratio == pytest.approx(1.12)
    # 1.5 % faster is inside the 3 % noise margin: not a gain the search may buy
    assert "noise floor" in why[("o", "int8")].why


def test_a_dropped_form_is_never_chosen_even_when_free() -> None:
    ratios = {"a": {"float": {"s": 1.0}, "2:4": {"s": 1.04}, "int8": {"s": 0.7}}}
    kept, _ = drop_slower_forms(ratios, 0.03)
    # build the options the tuner builds: only kept forms become choices
    st = _structure({"a": {f: (-3.0 if f == "int8" else +0.4, 0.0) for f in kept["a"] - {"float"}}})
    plan = choose(pareto_front(st, 100.0, 0.01), 0.0)
    assert plan is not None and plan.forms["a"] == "int8"


def test_merge_keeps_only_undominated_plans_and_step_back_moves_toward_fidelity() -> None:
    a = Plan("6x1536", {"x": "int8"}, 70.0, 0.996, 100.0)
    b = Plan("5x1024", {"x": "int8"}, 50.0, 0.975, 100.0)
    c = Plan("5x1024", {"x": "float"}, 75.0, 0.98, 100.0)  # slower than a and less faithful
    d = Plan("4x768", {"x": "int8"}, 35.0, 0.95, 100.0)
    front = merge_fronts([[a], [b, c], [d]])
    assert front == [a, b, d]
    assert choose(front, 0.97) == b
    assert step_back(front, b) == a
    assert step_back(front, a) is None
    assert choose(front, 0.999) is None


def test_sparse_int8_must_beat_plain_int8_not_just_float() -> None:
    ratios = {
        "a": {
            "float": {"s": 1.0},
            "int8": {"s": 0.74},
            "2:4+int8": {"s": 0.73},
        },  # zeros multiplied like weights
        "b": {"float": {"s": 1.0}, "int8": {"s": 0.74}, "2:4+int8": {"s": 0.45}},  # a sparse int8 kernel
    }
    kept, rejected = drop_slower_forms(ratios, 0.03)
    assert kept == {"a": {"float", "int8"}, "b": {"float", "int8", "2:4+int8"}}
    assert [(r.layer, r.form) for r in rejected] == [("a", "2:4+int8")]
    assert "than int8" in rejected[0].why


def test_recovery_is_extrapolated_as_a_power_law_and_never_below_the_probe() -> None:
    from compressor.app.tune.search import extrapolate_recovery

    # loss 0.08 -> 0.04 over 50 -> 100 steps: k = 1, so 1000 steps leave 0.004
    assert extrapolate_recovery(0.92, 0.96, 100, 1000) == pytest.approx(0.996)
    # loss 0.05 -> 0.04: k = log2(1.25) ~ 0.32; 800 steps: 0.04 * 8^-0.32 ~ 0.0205
    assert extrapolate_recovery(0.95, 0.96, 100, 800) == pytest.approx(1 - 0.04 * 8 ** -math.log2(1.25))
    assert extrapolate_recovery(0.96, 0.95, 100, 1000) == 0.95  # got worse: no gain predicted
    assert extrapolate_recovery(0.90, 0.96, 100, 100) == 0.96  # nothing left to extrapolate
    # a loss falling faster than 1/t is not extrapolated faster than 1/t
    assert extrapolate_recovery(0.80, 0.96, 100, 1000) == pytest.approx(1 - 0.04 / 10)


def test_a_layer_whose_own_timing_was_noisy_needs_a_wider_margin() -> None:
    """0.95x passes the profile's 3 % floor, but not where that layer's own float twin
    strayed by 8 %: that gain is inside its noise."""
    ratios = {
        "a": {"float": {"8x1": 1.0}, "int8": {"8x1": 0.95}},
        "b": {"float": {"8x1": 1.0}, "int8": {"8x1": 0.95}},
    }
    kept, rejected = drop_slower_forms(ratios, 0.03, {"a": {"8x1": 1.08}, "b": {"8x1": 1.01}})
    assert kept["a"] == {"float"} and kept["b"] == {"float", "int8"}
    assert [(r.layer, r.form) for r in rejected] == [("a", "int8")] and "margin 0.080" in rejected[0].why
