"""Any nn.Module through the pipeline: an MLP trained here on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.adapters.base import DataSplits
from compressor.adapters.module import ModuleAdapter
from compressor.app.compile import compile_recipe
from compressor.errors import DataError
from compressor.recipe import parse_recipe


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, DataSplits]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train_x, train_y, cal_x, test_x, test_y = x[:1200], y[:1200], x[1200:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        for i in range(0, len(train_x), 100):
            loss = nn.functional.cross_entropy(model(train_x[i : i + 100]), train_y[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    def batches(xs: torch.Tensor, ys: torch.Tensor | None, size: int = 64) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, len(xs), size):
            b = {"x": xs[i : i + size]}
            if ys is not None:
                b["labels"] = ys[i : i + size]
            out.append(b)
        return out

    data = DataSplits(
        calibration=batches(cal_x, None), train=batches(train_x, None), eval=batches(test_x, test_y)
    )
    return model, data


def test_any_module_compiles_to_a_verified_bundle(digits_mlp, tmp_path: Path) -> None:
    model, data = digits_mlp
    recipe = parse_recipe(
        {
            "name": "digits-mlp",
            "target": "cpu",
            "passes": [
                {"pass": "sparsify", "targets": ["0", "2"]},
                {
                    "pass": "distill",
                    "steps": 60,
                    "lr": 1e-3,
                    "warmup_steps": 2,
                    "loss": {"output": "mse", "hidden_weight": 0.0},
                },
                {"pass": "quantize", "targets": ["*"], "smoothquant": True, "alpha": 0.5},
            ],
            "exports": [{"format": "onnx"}],
        },
        "digits.yaml",
    )
    manifest = compile_recipe(
        recipe, tmp_path / "bundle", adapter=ModuleAdapter(model, data, input_names=("x",))
    )
    original, sparse, distilled, quantized = (p["metrics"] for p in manifest["passes"])
    assert original["teacher_accuracy"] > 0.93  # a real classifier
    assert distilled["relative_mse"] < sparse["relative_mse"]  # recovery recovered
    assert quantized["accuracy"] >= original["teacher_accuracy"] - 0.02
    assert quantized["top1_agreement"] > 0.97
    assert manifest["verification"]["onnx"]["min_cosine"] > 0.999
    assert "benchmark" not in manifest  # bench is for sentence encoders; nothing fake is written
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    out = sess.run(None, {"x": np.asarray(data.eval[0]["x"])})[0]
    assert out.shape == (64, 10)


def test_module_adapter_checks_its_data(digits_mlp) -> None:
    model, data = digits_mlp
    with pytest.raises(DataError, match=r"calibration batches lack the inputs \['image'\]"):
        ModuleAdapter(model, data, input_names=("image",))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("split", ["calibration", "train", "eval"])
def test_module_adapter_refuses_non_finite_data(digits_mlp, split: str, bad: float) -> None:
    import dataclasses

    model, data = digits_mlp
    batches = [dict(b) for b in getattr(data, split)]
    batches[1]["x"] = batches[1]["x"].clone()
    batches[1]["x"][3, 5] = bad
    broken = dataclasses.replace(data, **{split: batches})
    with pytest.raises(DataError) as e:
        ModuleAdapter(model, broken, input_names=("x",))
    msg = str(e.value)
    assert msg == (
        f"ModuleAdapter: {split} batch 1 input 'x' has 1 NaN or infinite values; clean or drop those examples"
    )
    ModuleAdapter(model, data, input_names=("x",))  # the clean data still goes through
