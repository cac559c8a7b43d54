"""Decoder language models (Llama / Qwen2 / Mistral style) from Hugging Face folders.

What the pipeline compares is the next-token distribution: ``forward`` returns the
logits [B, T, V] (what the exported ONNX outputs, named ``logits``). Fidelity against
the teacher is measured on held-out real text (standard-library docstrings), over
the tokens the attention mask keeps:

- ``perplexity`` of the student on the held-out text (next-token cross-entropy,
  exponentiated), beside ``teacher_perplexity`` and their ratio;
- ``kl_per_token``: mean KL(teacher ‖ student) of the next-token distributions;
- ``top1_agreement``: how often the student's most likely next token is the teacher's;
- ``mean_cosine`` / ``min_cosine`` of the logit rows (what recipe floors and the
  quantize pass's sensitivity search read for every adapter).

Structure: Llama-style decoders are pre-norm, so each ``input_layernorm`` feeds only
q/k/v and each ``post_attention_layernorm`` only gate/up: SmoothQuant divisors fold
into those RMSNorm weights (no run-time Mul), unlike post-LN BERT.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.adapters.base import (
    Batch,
    DataSplits,
    ExportSpec,
    Headline,
    ModelAdapter,
    SmoothGroup,
    TimingInputs,
    token_cases,
)
from compressor.adapters.hf_encoder import resolve_source, tokenize_texts, weight_stats
from compressor.adapters.text_batches import serving_length_of, text_splits
from compressor.errors import DataError, RecipeError


def is_causal_lm_folder(path: Path) -> bool:
    """Whether a Hugging Face folder's config names a ``*ForCausalLM`` architecture."""
    from compressor.adapters.hf_folder import read_json_object

    try:
        config = read_json_object(path / "config.json")
    except RecipeError:
        return False  # the adapter's load names what is wrong with the folder
    archs = config.get("architectures")
    return isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs)


class CausalLMLogits(nn.Module):
    """The traced wrapper: token ids and mask in, next-token logits [B, T, V] out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@torch.no_grad()
def lm_fidelity(triples: Iterable[tuple[torch.Tensor, torch.Tensor, Batch]]) -> dict[str, float]:
    """Perplexities, KL, top-1 agreement and logit cosines over the kept tokens of
    (student logits, teacher logits, batch) triples, consumed one at a time (the [B, T, V]
    logits of a real vocabulary are large)."""
    nll_s = nll_t = kl = agree = 0.0
    n_next = n_tok = 0
    cosines = []
    for s, t, b in triples:
        mask = b["attention_mask"].bool()
        s_rows, t_rows = s[mask].double(), t[mask].double()  # [tokens, V]
        log_s, log_t = F.log_softmax(s_rows, -1), F.log_softmax(t_rows, -1)
        kl += float((log_t.exp() * (log_t - log_s)).sum())
        agree += float((s_rows.argmax(-1) == t_rows.argmax(-1)).sum())
        cosines.append(F.cosine_similarity(s_rows, t_rows, dim=-1))
        n_tok += int(mask.sum())
        # next-token prediction: position i predicts token i + 1 where both are kept
        nxt = mask[:, 1:] & mask[:, :-1]
        target = b["input_ids"][:, 1:][nxt]
        nll_s += float(F.cross_entropy(s[:, :-1][nxt].double(), target, reduction="sum"))
        nll_t += float(F.cross_entropy(t[:, :-1][nxt].double(), target, reduction="sum"))
        n_next += int(nxt.sum())
    if n_tok == 0 or n_next == 0:
        raise DataError("no held-out tokens to score (every text is shorter than two tokens)")
    cos = torch.cat(cosines)
    ppl_s, ppl_t = math.exp(nll_s / n_next), math.exp(nll_t / n_next)
    return {
        "perplexity": ppl_s,
        "teacher_perplexity": ppl_t,
        "perplexity_ratio": ppl_s / ppl_t,
        "kl_per_token": kl / n_tok,
        "top1_agreement": agree / n_tok,
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
    }


class CausalLMAdapter(ModelAdapter):
    name = "hf-causal-lm"
    headline = Headline("perplexity_ratio", "perplexity ratio (student / teacher)", higher_is_better=False)
    fidelity_metrics = frozenset(
        {"perplexity", "teacher_perplexity", "perplexity_ratio", "kl_per_token", "top1_agreement"}
        | {"mean_cosine", "min_cosine"}
    )

    autoregressive = True

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.max_positions: int | None = None

    def load(self, source: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        from compressor.adapters.hf_folder import load_pretrained, load_tokenizer, read_model_config

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_source(source)
        if not is_causal_lm_folder(path):
            raise RecipeError(
                f"model.source: {str(path)!r} is not a causal language model (config.json names no "
                "*ForCausalLM architecture); use adapter hf-encoder for encoders"
            )
        config = read_model_config(path)
        self.tokenizer = load_tokenizer(path, config)
        self.max_positions = int(config.get("max_position_embeddings") or 0) or None
        if self.tokenizer.pad_token is None:  # decoder tokenizers often have none: pad with EOS
            if self.tokenizer.eos_token is None:
                raise RecipeError(
                    f"{path}: the tokenizer has neither a pad nor an end-of-sequence token; set "
                    "pad_token or eos_token in tokenizer_config.json"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        model = load_pretrained(AutoModelForCausalLM, path)
        if not hasattr(getattr(model, "model", None), "layers"):
            raise RecipeError(
                f"model.source: {type(model).__name__} is not a Llama-style decoder (expected .model.layers)"
            )
        return model.float().eval()

    # ---- data -------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_length: int, pad_to_max: bool = False) -> Batch:
        enc = tokenize_texts(self.tokenizer, texts, max_length, pad_to_max)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def serving_length(self) -> int | None:
        """The recipe's context where it sets ``data.max_length``; else the tokenizer's and the
        position table's limit, capped at 512 tokens (calibrating a 128k context on a CPU is not
        what a default should do)."""
        limit = serving_length_of(None, self.tokenizer, self.max_positions)
        return min(limit, 512) if limit else None

    def make_data(self, spec: Any, seed: int) -> DataSplits:
        return text_splits(self, spec, seed)

    def timing_inputs(self) -> TimingInputs:
        """Held-out text of every default domain (``compressor.text_data.held_out_texts``), as
        the encoders time theirs: 2 texts for the trace, ``batch`` padded to the timed length
        (a length of 1 is a decode step's one new token; the plain ``onnx`` export that
        ``compressor tune`` times has no KV cache, so the attention over earlier tokens is not
        in what it times: the ``onnx_genai`` export has one, and ``compressor bench`` times a
        decoder bundle through it, ``compressor.app.bench_lm``). No ``bench_inputs``: the
        bench scores a decoder by its greedy tokens, not by these."""
        from compressor.text_data import held_out_texts

        def timing(batch: int, seq_len: int) -> Batch:
            # tokenized at 16 tokens or more, then cut: a tokenizer that adds special tokens
            # cannot truncate to one
            length = max(seq_len, 16)
            enc = self.tokenize(held_out_texts(batch, 1, length), length, pad_to_max=True)
            return {k: v[:, :seq_len].contiguous() for k, v in enc.items()}

        return TimingInputs(example=lambda: self.tokenize(held_out_texts(2, 0, 16), 16), timing=timing)

    # ---- running ----------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits

    def forward_with_hidden(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
            output_hidden_states=True,
        )
        return out.logits, list(out.hidden_states[1:])

    @torch.no_grad()
    def metrics(self, model: nn.Module, teacher: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            stats = lm_fidelity((self.forward(model, b), self.forward(teacher, b), b) for b in batches)
        finally:
            model.train(was_training)
        stats.update(weight_stats(model))
        return stats

    # ---- structure --------------------------------------------------------------------
    def linear_names(self, model: nn.Module) -> list[str]:
        """The decoder layers' Linears; ``lm_head`` stays out unless a recipe targets it."""
        return [
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")
        ]

    def smooth_groups(self, model: nn.Module) -> list[SmoothGroup]:
        groups = []
        lm: Any = model
        for i, _ in enumerate(lm.model.layers):
            p = f"model.layers.{i}"
            groups.append(
                SmoothGroup(f"{p}.input_layernorm", tuple(f"{p}.self_attn.{x}_proj" for x in "qkv"))
            )
            groups.append(SmoothGroup(None, (f"{p}.self_attn.o_proj",)))
            groups.append(
                SmoothGroup(f"{p}.post_attention_layernorm", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"))
            )
            groups.append(SmoothGroup(None, (f"{p}.mlp.down_proj",)))
        return groups

    def verification_cases(
        self, batch: Batch, batch_sizes: Sequence[int], lengths: Sequence[int]
    ) -> list[Batch]:
        return token_cases(batch, batch_sizes, lengths)

    def export_spec(self, model: nn.Module, batch: Batch, fused: bool = True) -> ExportSpec:
        """transformers' own forward, traced (no KV cache): ``logits`` [batch, sequence, vocab]."""
        names = ("input_ids", "attention_mask")
        dyn = {n: {0: "batch", 1: "sequence"} for n in (*names, "logits")}
        return ExportSpec(
            module=CausalLMLogits(model).eval(),
            example_inputs=tuple(batch[n] for n in names),
            input_names=names,
            output_names=("logits",),
            dynamic_axes=dyn,
        )
