"""Any ``nn.Module``: the adapter used from Python when no model family fits.

The caller hands over the model and its data (calibration / training / held-out
batches, each a dict of tensors keyed by the model's positional input names). The
output that fidelity and distillation compare is the model's output flattened per
example; when a batch carries ``labels`` and the output looks like class scores, the
metrics add the accuracy and the top-1 agreement with the teacher.

    adapter = ModuleAdapter(model, data, input_names=("x",))
    manifest = compile_recipe(recipe, out_dir, adapter=adapter)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.adapters.base import Batch, DataSplits, ExportSpec, Headline, ModelAdapter
from compressor.adapters.hf_encoder import weight_stats
from compressor.errors import DataError, RecipeError


def _check_finite(split: str, batches: Sequence[Batch]) -> None:
    """Refuse NaN / inf in float inputs: they would pass calibration silently and turn every
    scale, loss and metric into NaN passes later."""
    for i, batch in enumerate(batches):
        for key, value in batch.items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and not bool(value.isfinite().all())
            ):
                bad = int((~value.isfinite()).sum())
                raise DataError(
                    f"ModuleAdapter: {split} batch {i} input {key!r} has {bad} NaN or infinite values; "
                    "clean or drop those examples"
                )


class ModuleAdapter(ModelAdapter):
    name = "module"
    headline = Headline("mean_cosine", "mean cosine vs the teacher", higher_is_better=True)
    fidelity_metrics = frozenset({"mean_cosine", "min_cosine", "relative_mse"})  # + accuracy with labels

    def __init__(
        self,
        model: nn.Module,
        data: DataSplits,
        input_names: Sequence[str] = ("input",),
        output_name: str = "output",
        hidden_modules: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.data = data
        self.input_names = tuple(input_names)
        self.output_name = output_name
        self.hidden_modules = tuple(hidden_modules)
        for split in ("calibration", "eval"):
            batches = getattr(data, split)
            if not batches:
                raise DataError(f"ModuleAdapter: no {split} batches")
            missing = [n for n in self.input_names if n not in batches[0]]
            if missing:
                raise DataError(f"ModuleAdapter: {split} batches lack the inputs {missing}")
        for split in ("calibration", "train", "eval"):
            _check_finite(split, getattr(data, split))
        names = {n for n, _ in model.named_modules()}
        unknown = [n for n in self.hidden_modules if n not in names]
        if unknown:
            raise RecipeError(f"ModuleAdapter: hidden_modules {unknown} are not modules of the model")

    def load(self, source: str) -> nn.Module:
        """The model given to the constructor (a copy, in eval mode); ``source`` is ignored."""
        return copy.deepcopy(self.model).float().eval()

    def make_data(self, spec: Any, seed: int) -> DataSplits:
        return self.data

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(*(batch[n] for n in self.input_names))
        return out.reshape(out.shape[0], -1)

    def forward_with_hidden(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        captured: list[torch.Tensor] = []
        hooks = [
            model.get_submodule(n).register_forward_hook(lambda _m, _i, o: captured.append(o))
            for n in self.hidden_modules
        ]
        try:
            out = self.forward(model, batch)
        finally:
            for h in hooks:
                h.remove()
        return out, captured

    @torch.no_grad()
    def metrics(self, model: nn.Module, teacher: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        model.eval()
        s = torch.cat([self.forward(model, b) for b in batches]).double()
        t = torch.cat([self.forward(teacher, b) for b in batches]).double()
        cos = F.cosine_similarity(s, t, dim=-1)
        out = {
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "relative_mse": float(((s - t) ** 2).sum() / (t**2).sum().clamp(min=1e-30)),
        }
        if all("labels" in b for b in batches) and s.shape[1] > 1:
            labels = torch.cat([b["labels"] for b in batches])
            out["accuracy"] = float((s.argmax(-1) == labels).double().mean())
            out["teacher_accuracy"] = float((t.argmax(-1) == labels).double().mean())
            out["top1_agreement"] = float((s.argmax(-1) == t.argmax(-1)).double().mean())
        out.update(weight_stats(model))
        return out

    def export_spec(self, model: nn.Module, batch: Batch, fused: bool = True) -> ExportSpec:
        return ExportSpec(
            module=model.eval(),
            example_inputs=tuple(batch[n] for n in self.input_names),
            input_names=self.input_names,
            output_names=(self.output_name,),
            dynamic_axes={**{n: {0: "batch"} for n in self.input_names}, self.output_name: {0: "batch"}},
        )
