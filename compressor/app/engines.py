"""The engines ``compressor bench`` times a bundle on, each loaded from one of its artifacts.

An :class:`Engine` turns a batch of model inputs into a zero-argument callable (bound to
inputs already on its device, so the timed call is the engine's work only; CUDA engines
synchronize before returning) and the callable's result into a CPU float tensor for the
fidelity score. Engines the bundle or this machine cannot run are not faked: the loader
raises :class:`EngineUnavailable` with the reason, and the benchmark reports it.

| name | artifact | runs |
|---|---|---|
| ``ort_fp32`` | none (baseline) | the original model exported as-is to ONNX, ONNX Runtime fp32 |
| ``torch_original`` | none (baseline) | the original model in torch eager (fp16 on CUDA, fp32 on CPU) |
| ``ort`` | ``artifacts.onnx`` | ONNX Runtime |
| ``ort_qdq`` | ``artifacts.onnx_qdq`` | the TensorRT-flavoured Q/DQ ONNX in ONNX Runtime |
| ``torch_eager`` | ``artifacts.torch_export`` | the compressed ExportedProgram in torch eager |
| ``torch_compile`` | ``artifacts.torch_export`` | the same under ``torch.compile`` (Inductor) |
| ``aoti`` | ``artifacts.aoti`` | the AOTInductor package in this Python process |
| ``native`` | ``artifacts.aoti`` | ``compressor-run`` (C++, libtorch): timed by itself |
| ``tensorrt`` | ``artifacts.tensorrt_plan`` | the TensorRT plan (where ``tensorrt`` imports and a GPU is present) |
| ``genai`` | ``artifacts.onnx_genai`` | a decoder LM's folder in ONNX Runtime GenAI: prefill and decode per token (``compressor.app.bench_lm``) |

The engines in :data:`CODE_ENGINES` execute code from the bundle as they load it (an
unpickled ExportedProgram, a shared library, TensorRT plugins): ``compressor bench`` loads
them only from a trusted bundle (``compressor.trust``); the ONNX engines load data.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError

Batch = Mapping[str, torch.Tensor]
RunFn = Callable[[], Any]

ENGINE_ARTIFACTS = {
    "ort_fp32": None,
    "torch_original": None,
    "ort": "onnx",
    "ort_qdq": "onnx_qdq",
    "torch_eager": "torch_export",
    "torch_compile": "torch_export",
    "aoti": "aoti",
    "native": "aoti",
    "tensorrt": "tensorrt_plan",
    "genai": "onnx_genai",  # decoder LM bundles: compressor.app.bench_lm times it
}
BASELINES = ("ort_fp32", "torch_original")
# Engines that execute code from the bundle as they load it (unpickling, dlopen, TensorRT
# plugins): run only on a trusted bundle (compressor.trust). The others load ONNX, data.
CODE_ENGINES = {
    "torch_eager": "it loads pickled code",
    "torch_compile": "it loads pickled code",
    "aoti": "it loads a shared library",
    "native": "it loads a shared library",
    "tensorrt": "a TensorRT plan can carry plugin code",
}
# What loading each artifact means (``compressor verify``); artifacts not here no engine loads.
ARTIFACT_KINDS = {
    "onnx": "data (ONNX graph)",
    "onnx_qdq": "data (ONNX graph)",
    "onnx_genai": "data (ONNX graph with its KV cache, genai_config.json, tokenizer files)",
    "torch_export": "code (pickled ExportedProgram)",
    "aoti": "code (AOTInductor shared library)",
    "tensorrt_plan": "code (TensorRT plan, may carry plugins)",
}


class EngineUnavailable(CompressorError):
    """This engine cannot run here or the bundle lacks its artifact (the message says which)."""


@dataclass
class Engine:
    name: str
    label: str
    bind: Callable[[Batch], RunFn]
    to_tensor: Callable[[Any], torch.Tensor] = field(default=lambda out: _first(out))
    # engines timed by their own process (the native runner) measure instead of bind
    measure: Callable[[Batch, int, int], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _first(out: Any) -> torch.Tensor:
    out = out[0] if isinstance(out, (list, tuple)) else out
    t = torch.from_numpy(np.asarray(out)) if isinstance(out, np.ndarray) else out
    return t.detach().float().cpu()


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _torch_engine(
    name: str, label: str, fn: Callable[..., Any], names: Sequence[str], device: torch.device, **info: Any
) -> Engine:
    sync = _sync(device)

    def bind(batch: Batch) -> RunFn:
        args = tuple(batch[n].to(device) for n in names)

        def run() -> Any:
            with torch.inference_mode():
                out = fn(*args)
            sync()
            return out

        return run

    return Engine(name, label, bind, info=dict(info))


def ort_engine(name: str, label: str, path: Path, threads: int, device: torch.device) -> Engine:
    import onnxruntime as ort

    from compressor.exporters.onnx.onnx import ort_session

    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineUnavailable(f"{name}: this onnxruntime has no CUDAExecutionProvider")
        sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    else:
        sess = ort_session(path, threads)
    wanted = [i.name for i in sess.get_inputs()]

    def bind(batch: Batch) -> RunFn:
        feed = {k: batch[k].numpy() for k in wanted}
        return lambda: sess.run(None, feed)

    return Engine(name, label, bind, info={"file": path.name, "providers": sess.get_providers()})


def torch_original_engine(
    model: nn.Module,
    forward: Callable[[nn.Module, Batch], torch.Tensor],
    names: Sequence[str],
    device: torch.device,
) -> Engine:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    m = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    label = f"original model, torch eager {str(dtype).removeprefix('torch.')}"
    return _torch_engine(
        "torch_original",
        label,
        lambda *args: forward(m, dict(zip(names, args))),
        names,
        device,
        dtype=str(dtype),
    )


def exported_program_engine(
    path: Path, names: Sequence[str], device: torch.device, program_device: str, compiled: bool
) -> Engine:
    program = torch.export.load(str(path))
    if torch.device(program_device).type != device.type:
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    module = program.module()
    if compiled:
        return _torch_engine(
            "torch_compile", "bundle, torch.compile (Inductor)", torch.compile(module), names, device
        )
    return _torch_engine("torch_eager", "bundle, torch eager (ExportedProgram)", module, names, device)


def aoti_engine(path: Path, names: Sequence[str], device: torch.device, package_device: str) -> Engine:
    if torch.device(package_device).type != device.type:
        raise EngineUnavailable(
            f"aoti: the package was compiled for {package_device}, the bench runs on {device}"
        )
    from torch._inductor import aoti_load_package

    runner = aoti_load_package(str(path))
    return _torch_engine("aoti", "bundle, AOTInductor (Python)", runner, names, device)


def native_engine(exe: Path, package: Path, names: Sequence[str], threads: int) -> Engine:
    """``compressor-run`` on the bundle's package: the C++ process times itself (its own warm-up
    and iterations), so its figures are not from the rotation the Python engines share."""
    from compressor.app.native import run_runner
    from compressor.exporters.runner_inputs import write_runner_inputs

    def measure(batch: Batch, warmup: int, repeats: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="compressor-native-") as tmp:
            folder = Path(tmp)
            os.symlink(package.resolve(), folder / "model.pt2")
            (folder / "manifest.json").write_text(json.dumps({"artifacts": {"aoti": "model.pt2"}}))
            write_runner_inputs(folder, {n: batch[n] for n in names})
            r = run_runner(exe, folder, iters=repeats, warmup=warmup, threads=threads)
        median = float(r["p50_ms"])
        return {
            "median_ms": round(median, 3),
            "p90_ms": round(float(r["p90_ms"]), 3),
            "p99_ms": round(float(r["p99_ms"]), 3),
            "mean_ms": round(float(r["mean_ms"]), 3),
            "throughput_per_s": round(float(r["throughput"]), 2),
            "repeats": int(r["iters"]),
        }

    def bind(batch: Batch) -> RunFn:
        raise EngineUnavailable("native: compressor-run returns latency, not outputs")

    return Engine(
        "native", "bundle, compressor-run (C++, libtorch)", bind, measure=measure, info={"runner": str(exe)}
    )


def tensorrt_engine(path: Path, names: Sequence[str], device: torch.device) -> Engine:
    """A TensorRT plan through TensorRT's Python API (10.x: named I/O tensors,
    ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) on torch CUDA tensors.
    TensorRT is not installable where this project is developed: this path follows the
    documentation and runs only where ``tensorrt`` imports."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineUnavailable("tensorrt: the tensorrt package does not import here") from None
    if device.type != "cuda":
        raise EngineUnavailable("tensorrt: needs the bench on a CUDA device (--device cuda)")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineUnavailable(
            f"tensorrt: {path.name} did not deserialize (built by another TensorRT or GPU?)"
        )
    context = engine.create_execution_context()
    io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
                   trt.int32: torch.int32, trt.bfloat16: torch.bfloat16}  # fmt: skip

    def bind(batch: Batch) -> RunFn:
        stream = torch.cuda.current_stream()
        ins = {n: batch[n].to(device).contiguous() for n in names if n in io}
        for n, t in ins.items():
            context.set_input_shape(n, tuple(t.shape))
            context.set_tensor_address(n, t.data_ptr())
        outs = {
            n: torch.empty(tuple(context.get_tensor_shape(n)), dtype=torch_dtype[engine.get_tensor_dtype(n)],
                           device=device)
            for n in outputs
        }  # fmt: skip
        for n, t in outs.items():
            context.set_tensor_address(n, t.data_ptr())

        def run() -> Any:
            if not context.execute_async_v3(stream.cuda_stream):
                raise CompressorError("tensorrt: execute_async_v3 failed")
            stream.synchronize()
            return [outs[n] for n in outputs]

        return run

    return Engine("tensorrt", "bundle, TensorRT plan", bind, info={"file": path.name})


def find_runner(explicit: Path | None) -> Path:
    """``compressor-run``: the given executable, else one built earlier into the user cache
    (built there with CMake on first use)."""
    if explicit is not None:
        if not explicit.is_file():
            raise EngineUnavailable(f"native: {explicit} is not a file")
        return explicit
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor"
    build = cache / f"runner-torch-{torch.__version__.replace('+', '-')}"
    exe = build / "compressor-run"
    if exe.is_file():
        return exe
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        raise EngineUnavailable(
            "native: building compressor-run needs cmake and a C++ compiler (or --runner)"
        )
    from compressor.app.native import build_runner

    return build_runner(build)
