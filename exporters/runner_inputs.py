"""The native runner's sample inputs, written beside an AOTInductor package.

``compressor-run BUNDLE_DIR`` (``compressor.app.native``) runs the bundle's package on
them: ``runner_inputs.txt`` lists one input per line in call order, ``name dtype ndim dim0
dim1 ... file``, and each file holds the tensor's raw little-endian bytes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

RUNNER_INPUTS = "runner_inputs.txt"
_DTYPES = {torch.int64: "int64", torch.int32: "int32", torch.float32: "float32"}


def write_runner_inputs(folder: Path, inputs: Mapping[str, torch.Tensor]) -> list[str]:
    """Write ``inputs`` (in call order) for ``compressor-run``; returns the files written."""
    lines, files = [], [RUNNER_INPUTS]
    for name, t in inputs.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"runner input {name}: dtype {t.dtype} is not one of int64, int32, float32")
        if not name.isidentifier():
            raise ValueError(f"runner input name {name!r} must be an identifier")
        file = f"runner_input_{name}.bin"
        arr = t.detach().cpu().contiguous().numpy()
        (folder / file).write_bytes(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        lines.append(" ".join([name, _DTYPES[t.dtype], str(t.dim()), *map(str, t.shape), file]))
        files.append(file)
    (folder / RUNNER_INPUTS).write_text("\n".join(lines) + "\n")
    return files
