"""What each candidate form costs in fidelity, layer by layer, on the calibration data.

The cost of a form on a layer is the calibration fidelity (against the teacher, on the
budget's scale: the mean cosine, or minus the log perplexity ratio) lost when only that
layer takes the form and every other layer stays as the structure left
it: the one-layer-at-a-time sensitivity that mixed precision already ranks layers by
(``compressor.passes.quantize.mixed_precision``), extended from int8-or-float to every
form the profile kept. Int8 forms are built as the ``quantize`` pass builds them
(``quantize_linears_``, SmoothQuant at ``alpha`` with this layer's own divisor), int4 by
round-to-nearest in its groups, 2:4 by magnitude. The held-out split is never read here:
it judges the chosen plan afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compressor.adapters.base import Batch, ModelAdapter
from compressor.app.tune.forms import FORMS
from compressor.app.tune.options import Budget
from compressor.modules import get_linear, set_module
from compressor.passes.quantize.int8_math import (
    activation_absmax,
    mean_cosine,
    output_rows,
    quantize_linears_,
)


def budget_scorer(
    budget: Budget,
) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[Batch]], float]:
    """How a probe scores outputs against the teacher's on the budget's scale: the mean
    cosine of the output rows; or ``-log`` of the perplexity ratio on the calibration text
    (next-token cross-entropy over the kept tokens, ``causal_lm.lm_fidelity``)."""
    if budget.metric == "perplexity_ratio":
        from compressor.adapters.causal_lm import lm_fidelity

        def ppl(outs, refs, batches):
            return budget.score(lm_fidelity(zip(outs, refs, batches, strict=True))["perplexity_ratio"])

        return ppl
    return lambda outs, refs, batches: mean_cosine(output_rows(outs), output_rows(refs))


class SampledFD:
    """How an ``fd`` budget scores a model: ``-(fd_teacher + FD(its samples, the teacher's))``.

    ``fd_teacher`` is the teacher's own Frechet distance to the held-out real images, as the
    compile measures the original (nothing is fitted to it: it is the point the estimate
    starts from); the second term is the Frechet distance, in the same classifier's
    features, from the model's samples to the teacher's for the same labels and noise
    (``n`` of them, no real image read). Errors of separate layers add in it to first order
    (a squared distance), which is what the search assumes of a cost; FD to real data does
    not split so, and the verification judges that."""

    def __init__(self, adapter: Any, teacher: nn.Module, n: int, held_out: Sequence[Batch]) -> None:
        self.adapter, self.n = adapter, n
        with torch.no_grad():
            self.reference = adapter.sample_images(teacher, n)
            self.teacher_fd = float(adapter.metrics(teacher, teacher, held_out)["fd"])

    @torch.no_grad()
    def fidelity(self, model: nn.Module) -> float:
        own = self.adapter.sample_fd(self.adapter.sample_images(model, self.n), self.reference)
        return -(self.teacher_fd + max(0.0, own))


class SensitivityProbe:
    """Scores models against the teacher on the calibration data, on the budget's scale
    (``Budget.score``: higher is better, one-layer losses add): the outputs on the
    calibration batches against the teacher's, or for an ``fd`` budget ``SampledFD``.
    ``teacher_score`` is the teacher's own (1 for a cosine, 0 for a perplexity ratio)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        teacher: nn.Module,
        batches: Sequence[Batch],
        budget: Budget,
        alpha: float = 0.8,
        samples: int = 128,
        held_out: Sequence[Batch] = (),
    ) -> None:
        self.adapter = adapter
        self.batches = list(batches)
        self.alpha = alpha
        self.sampled = SampledFD(adapter, teacher, samples, held_out) if budget.metric == "fd" else None
        self.score = budget_scorer(budget)
        with torch.no_grad():
            self.reference = [] if self.sampled else [adapter.forward(teacher, b) for b in self.batches]
        self.teacher_score = self.fidelity(teacher)

    @torch.no_grad()
    def fidelity(self, model: nn.Module) -> float:
        if self.sampled is not None:
            return self.sampled.fidelity(model)
        outs = [self.adapter.forward(model, b) for b in self.batches]
        return self.score(outs, self.reference, self.batches)

    def with_form(
        self, model: nn.Module, name: str, form: str, stats: Mapping[str, torch.Tensor]
    ) -> nn.Module:
        """A copy of ``model`` with layer ``name`` alone in ``form``."""
        m = copy.deepcopy(model).eval()
        f = FORMS[form]
        if f.int8_scheme is not None:
            groups = [g for g in self.adapter.smooth_groups(m) if name in g.linears]
            quantize_linears_(m, [name], f.int8_scheme, groups, dict(stats), self.alpha, False)
        else:
            set_module(m, name, f.build(get_linear(m, name), None))
        return m

    def costs(
        self,
        model: nn.Module,
        forms_of: Mapping[str, Sequence[str]],
        on_step: Callable[[int, int], object] | None = None,
    ) -> tuple[float, dict[str, dict[str, float]], list[str]]:
        """The model's own calibration fidelity, ``costs[layer][form]`` for every form of
        ``forms_of`` but float (cost 0), and the inert layers: those no form changes the
        output of by a single bit (a pooler whose output the embedding never reads), left
        out of ``costs`` since no latency they save is real. A cost below 0 (a form that
        happens to help on the calibration data) counts as 0: the search must not buy speed
        with noise."""
        model = model.eval()
        names = [n for n, fs in forms_of.items() if any(f != "float" for f in fs)]
        stats = activation_absmax(model, names, self.adapter.forward, self.batches)
        base = self.fidelity(model)
        total = sum(len([f for f in forms_of[n] if f != "float"]) for n in names)
        done = 0
        out: dict[str, dict[str, float]] = {}
        inert: list[str] = []
        for n in names:
            raw: dict[str, float] = {}
            for form in forms_of[n]:
                if form == "float":
                    continue
                raw[form] = base - self.fidelity(self.with_form(model, n, form, stats))
                done += 1
                if on_step is not None:
                    on_step(done, total)
            if all(v == 0.0 for v in raw.values()):
                inert.append(n)
                continue
            out[n] = {"float": 0.0, **{f: max(0.0, v) for f, v in raw.items()}}
        return base, out, inert
