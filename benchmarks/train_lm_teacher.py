"""A small Llama-architecture LM trained here on the standard-library text: the decoder the LM
figures are measured on (the tiny random configs stay for logic tests).

- Text: the broad default's training side (``compressor.data``): the wide stdlib docstring set
  and the training split of the Python reference prose. Nothing from a held-out split is
  trained on, and the dataset descriptions (the held-out domain) are never seen.
- Tokenizer: a byte-level BPE trained on that text with ``tokenizers`` (``--vocab``), saved as
  ``tokenizer.json`` with ``<s>`` / ``</s>`` / ``<pad>``; every byte is encodable, so no
  unknown tokens.
- Model: ``LlamaForCausalLM`` (RMSNorm, SwiGLU, rotary, grouped-query attention), tied
  embeddings, trained with AdamW and a cosine schedule on packed ``--seq-len`` windows for
  ``--minutes`` (or ``--steps``) on this CPU. ``--val-fraction`` of the windows are held back
  and the model with the lowest loss on them is the one saved (early stopping: the corpus is
  about 224k tokens, which a model of tens of millions of parameters overfits).
- Out: a Hugging Face folder (safetensors, tokenizer, generation config) and
  ``train_lm_teacher.json`` beside it: the held-out perplexity per domain (next-token
  cross-entropy over the held-out texts, the ``hf-causal-lm`` adapter's own measure), the
  loss curve, the host and the time taken.

    python benchmarks/train_lm_teacher.py [--out benchmarks/.cache/lm-teacher] [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_OUT = Path(__file__).resolve().parent / ".cache" / "lm-teacher"
SPECIALS = ("<s>", "</s>", "<pad>")


def corpus() -> tuple[list[str], dict[str, list[str]]]:
    """Training texts and held-out texts per domain (the splits every recipe uses)."""
    from compressor.data import (
        dataset_description_paragraphs,
        hashed_splits,
        python_reference_paragraphs,
        stdlib_docstring_splits,
        train_texts,
    )

    reference = hashed_splits(python_reference_paragraphs())
    train = list(train_texts(True)) + list(reference.train)
    held_out = {
        "python-docstrings": list(stdlib_docstring_splits().eval),
        "python-reference": list(reference.eval),
        "dataset-descriptions": list(dataset_description_paragraphs()),
    }
    return train, held_out


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )


def packed_windows(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    """Every text as ``<s> text </s>``, concatenated and cut into ``seq_len`` windows."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def validation_loss(model: Any, val: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy over the validation windows (at most 128 of them)."""
    model.eval()
    losses = [
        float(model(input_ids=val[i : i + batch], labels=val[i : i + batch], use_cache=False).loss)
        for i in range(0, min(len(val), 128), batch)
    ]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def held_out_perplexity(
    model: Any, tokenizer: Any, texts: list[str], max_length: int, batch: int = 16
) -> float:
    """exp of the mean next-token cross-entropy over the kept tokens of each text (as
    ``compressor.adapters.causal_lm.lm_fidelity`` scores one)."""
    import torch.nn.functional as F

    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(texts), batch):
        enc = tokenizer(
            texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        logits = model(**enc, use_cache=False).logits
        keep = enc["attention_mask"][:, 1:].bool() & enc["attention_mask"][:, :-1].bool()
        target = enc["input_ids"][:, 1:][keep]
        nll += float(F.cross_entropy(logits[:, :-1][keep].double(), target, reduction="sum"))
        n += int(keep.sum())
    model.train()
    return math.exp(nll / max(1, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--val-fraction", type=float, default=0.05, help="training windows held back for early stopping"
    )
    ap.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    ap.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop after this many validation losses without a new best (0: never)",
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="train until this much time has passed")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps instead (0: by time)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.monotonic()
    train, held_out = corpus()
    tokenizer = train_tokenizer(train, args.vocab)
    windows = packed_windows(tokenizer, train, args.seq_len)
    # early stopping: a fixed share of the training windows is never trained on; the saved model
    # is the one with the lowest loss on them (a small corpus overfits a model this size)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n_val = max(1, int(windows.shape[0] * args.val_fraction))
    val, windows = windows[order[:n_val]], windows[order[n_val:]]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{len(train)} training texts -> {windows.shape[0]} windows of {args.seq_len} tokens; {params:,} parameters"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget_s = args.minutes * 60.0
    # the cosine schedule needs a length: by steps, or by the time the first steps take
    planned = args.steps or 0
    curve: list[dict[str, float]] = []
    val_curve: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    step, start = 0, time.monotonic()
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    while True:
        elapsed = time.monotonic() - start
        if (args.steps and step >= args.steps) or (not args.steps and elapsed >= budget_s):
            break
        if not args.steps and step == 5:
            planned = max(10, int(budget_s / (elapsed / 5)))
        total = planned or 1000
        warm = max(1, total // 20)
        lr = args.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
        for g in opt.param_groups:
            g["lr"] = max(lr, args.lr * 0.05)
        idx = torch.randint(0, windows.shape[0], (args.batch,), generator=gen)
        batch = windows[idx]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0 or step == 1:
            value = loss.item()
            curve.append({"step": step, "loss": round(value, 4), "s": round(time.monotonic() - start, 1)})
            print(f"step {step}/{total}  loss {value:.3f}  {time.monotonic() - start:.0f} s", flush=True)
        if step % args.eval_every == 0:
            v = validation_loss(model, val)
            val_curve.append({"step": step, "val_loss": round(v, 4)})
            print(f"step {step}  validation loss {v:.3f}", flush=True)
            if best is None or v < best[0]:
                best = (v, step, {k: t.detach().clone() for k, t in model.state_dict().items()})
            elif args.patience and step - best[1] >= args.patience * args.eval_every:
                print(f"no new best validation loss in {args.patience} evaluations: stopping", flush=True)
                break
    train_s = time.monotonic() - start
    final_val = validation_loss(model, val)
    if best is not None and best[0] < final_val:
        model.load_state_dict(best[2])
        kept = best[1]
    else:
        kept, best = step, (final_val, step, {})
    print(f"keeping step {kept} (validation loss {best[0]:.3f})")
    model.eval()
    ppl = {d: round(held_out_perplexity(model, tokenizer, texts, 256), 3) for d, texts in held_out.items()}
    print("held-out perplexity:", ppl)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    ).save_pretrained(out)
    record = {
        "parameters": params,
        "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads")},
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": step,
        "kept_step": kept,
        "validation_windows": int(val.shape[0]),
        "validation_loss": round(best[0], 4),
        "validation_curve": val_curve,
        "tokens_seen": step * args.batch * args.seq_len,
        "train_windows": int(windows.shape[0]),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "held_out_perplexity": ppl,
        "curve": curve,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads()},
    }  # fmt: skip
    (out / "train_lm_teacher.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
