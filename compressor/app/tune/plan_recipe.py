"""A chosen plan written as an ordinary recipe, in the passes' own vocabulary.

The plan's structure becomes a ``prune`` pass (depth, FFN width, the full recovery), its
2:4 layers a ``sparsify`` pass, each group of layers sharing a quantized form one
``quantize`` pass whose ``targets`` name exactly those layers (the int8 ones with
SmoothQuant and its alpha search, as the hand-made recipes do), then a short
quantization-aware distillation. The budget becomes the recipe's fidelity floor, so
``compressor compile --recipe tuned.yaml`` judges the held-out data exactly as the tuner
did, and fails rather than ship a plan that misses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from compressor.app.tune.forms import FORMS
from compressor.app.tune.search import Plan

MARKER = "# written by compressor tune"
"""The first line of every recipe the tuner writes: ``--overwrite`` replaces only such files."""

QUANTIZED_ORDER = ("int8", "int8_per_token", "int8_static", "int4_g32", "int4_g64", "int4_g128")


def plan_passes(
    plan: Plan, prune: Mapping[str, int] | None, recover_steps: int, qad_steps: int
) -> list[dict[str, Any]]:
    """The recipe's ``passes`` for ``plan`` (layer names as the pruned model has them)."""
    passes: list[dict[str, Any]] = []
    if prune:
        passes.append(
            {
                "pass": "prune",
                **dict(prune),
                "ffn_multiple_of": 64,
                "recover": {
                    "steps": recover_steps,
                    "lr": 1.0e-3,
                    "warmup_steps": max(1, recover_steps // 100),
                },
            }
        )
    by_form: dict[str, list[str]] = {}
    for name, form in plan.forms.items():
        by_form.setdefault(form, []).append(name)
    sparse = [n for f in ("2:4", "2:4+int8") for n in by_form.get(f, [])]
    if sparse:
        passes.append({"pass": "sparsify", "targets": sparse})
    int8_groups = {**{f: by_form.get(f, []) for f in QUANTIZED_ORDER}}
    int8_groups["int8"] = int8_groups["int8"] + by_form.get("2:4+int8", [])
    for form in QUANTIZED_ORDER:
        names = int8_groups[form]
        if not names:
            continue
        options: dict[str, Any] = {"pass": "quantize", **FORMS[form].quantize, "targets": names}
        if options["method"] == "int8":
            options.update({"smoothquant": True, "alpha_grid": [0.6, 0.7, 0.8, 0.9]})
        passes.append(options)
    if any(p["pass"] == "quantize" for p in passes) and qad_steps > 0:
        passes.append(
            {"pass": "distill", "steps": qad_steps, "lr": 3.0e-5, "warmup_steps": max(1, qad_steps // 10)}
        )
    return passes


def plan_recipe(
    plan: Plan,
    prune: Mapping[str, int] | None,
    base: Mapping[str, Any],
    *,
    name: str,
    budget_key: str,
    budget_value: float,
    batches: tuple[int, ...],
    seq_len: int,
    threads: int,
    recover_steps: int,
    qad_steps: int,
) -> dict[str, Any]:
    """The whole recipe: ``base``'s model, target, data and exports, ``plan``'s passes, the
    budget as the fidelity floor and the tuned shapes as the bench."""
    data = dict(base.get("data", {}))
    if prune:  # recovery wants every training text there is (as minilm-cpu-pruned-int8)
        data.update({"train_samples": max(int(data.get("train_samples", 0)), 8192), "wide_train": True})
    evaluation: dict[str, Any] = {
        budget_key: budget_value,
        "bench": {
            "batch_sizes": list(batches),
            "seq_len": seq_len,
            "threads": threads,
            "warmup": 2,
            "repeats": 10,
        },
    }
    description = f"tuned for {base['target']}: " + ", ".join(
        f"{k} x{v}" for k, v in sorted(plan.counts().items())
    )
    if prune:
        description += f"; pruned to {prune.get('layers')} layers, FFN {prune.get('ffn')}"
    return {
        "name": name,
        "description": description,
        "model": dict(base["model"]),
        "target": base["target"],
        "seed": base.get("seed", 0),
        "data": data,
        "passes": plan_passes(plan, prune, recover_steps, qad_steps),
        "exports": [dict(e) for e in base.get("exports", [])],
        "evaluation": evaluation,
    }


def recipe_yaml(recipe: Mapping[str, Any], header: list[str]) -> str:
    """The recipe as YAML under the tuner's marker and ``header`` comment lines."""
    lines = [MARKER] + [f"# {h}" if h else "#" for h in header]
    return "\n".join(lines) + "\n" + yaml.safe_dump(dict(recipe), sort_keys=False, width=100)
