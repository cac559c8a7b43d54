"""Shared fixtures for the compression-math tests: correlated layer inputs, tiny models."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from compressor.adapters.base import DataSplits, ModelAdapter
from compressor.recipe import DataSpec

LM_SPEC = DataSpec(calibration_samples=16, train_samples=32, eval_samples=16, max_length=32, batch_size=8)
"""The data of the tiny-LM tests: small splits of the stdlib docstring corpus."""


def correlated_inputs(n: int, din: int, seed: int = 0, outliers: int = 0) -> torch.Tensor:
    """Inputs (n, din) with strongly correlated channels of unequal scale, like real
    transformer activations (``outliers`` channels are 20x larger)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(din, din, generator=g) / din**0.5
    x = torch.randn(n, din, generator=g) @ (torch.eye(din) + 2.0 * mix)
    scale = torch.rand(din, generator=g) * 3 + 0.2
    if outliers:
        scale[torch.randperm(din, generator=g)[:outliers]] *= 20.0
    return x * scale


def rel_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||XWᵀ - XŴᵀ|| / ||XWᵀ||."""
    ref = x @ w.t()
    return float((ref - x @ w_hat.t()).norm() / ref.norm())


def tiny_bert(layers: int = 2, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=layers, vocab_size=100
    )
    return BertModel(cfg).eval()


def tiny_llama(layers: int = 2, kv_heads: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=128,
        num_hidden_layers=layers,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def token_batches(n: int, batch: int = 4, seq: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 100, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        for _ in range(n)
    ]


def model_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def save_tiny_lm(family: str, out: Path, minilm_path: str) -> Path:
    """A tiny random Llama or Qwen2 saved as a Hugging Face folder with MiniLM's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.conftest import TOKENIZER_FILES

    torch.manual_seed(0)
    common = dict(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # wide enough that compression errors are measurable
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.eval().save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:  # MiniLM's WordPiece vocabulary: 30522 tokens, real text
        if (Path(minilm_path) / name).exists():
            shutil.copy(Path(minilm_path) / name, out / name)
    return out


class TinyAdapter(ModelAdapter):
    """The least adapter a pass needs: a model's output, no data or metrics of its own."""

    name = "tiny"

    def load(self, source: str) -> torch.nn.Module:
        raise NotImplementedError

    def make_data(self, spec: object, seed: int) -> DataSplits:
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_output(model, batch)

    def metrics(self, model, teacher, batches: Sequence) -> dict[str, float]:
        return {}
