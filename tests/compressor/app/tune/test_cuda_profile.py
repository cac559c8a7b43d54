"""The tuner's GPU backend: layer forms timed on the device (runs where a CUDA GPU is present)."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.app.tune.cuda_profile import cuda_matches
from compressor.app.tune.forms import legal_forms
from compressor.targets import get_target


def test_a_gpu_target_without_its_gpu_is_not_measured_here() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert not cuda_matches(get_target("h100"))
    assert not cuda_matches(get_target("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_forms_are_timed_on_the_gpu_beside_their_float_twin() -> None:
    from compressor.app.tune.cuda_profile import time_linear_forms_cuda

    target = get_target("h100")
    forms = [f for f in legal_forms(target, 384) if f.name in ("int8", "int8_per_token", "int4_g128")]
    row = time_linear_forms_cuda(384, 1536, 32, 128, forms, turns=5)
    for f in ["float", "float_twin", *(f.name for f in forms)]:
        assert row[f] > 0 and math.isfinite(row[f])
    assert 0.5 < row["float_twin/ratio"] < 2.0  # the same layer twice: the noise floor
