"""Checking a Hugging Face model folder before anything in it is loaded.

A model folder is untrusted input: a stranger's download, a half-copied checkpoint, a
folder that never held a tokenizer. Transformers answers most of these with a traceback
from deep inside, some (``auto_map``, pickled ``pytorch_model.bin``) by running the
folder's code, and one (no tokenizer files) silently, with a 5-token vocabulary that maps
every word to ``[UNK]``. Here each is refused by name, before and after loading:

- ``config.json``: a JSON object, at most ``MAX_CONFIG_BYTES``, a ``model_type`` this
  Transformers knows, and nothing that asks for the folder's own Python code (``auto_map``
  in the config or tokenizer config, or a ``*.py`` module it names);
- weights: ``model.safetensors`` or a sharded ``model.safetensors.index.json`` whose shards
  sit in the folder, each header parsed by safetensors itself (``safe_open``; nothing is
  unpickled), so a truncated or random file is named before Transformers touches it;
- after loading: every weight the model needs came from the file with the shape the config
  gives (no randomly initialised layer), and every weight is finite;
- the tokenizer: its files exist, it has a fast form (``tokenizers``: what a bundle carries
  as ``tokenizer.json`` for ``compressor.runtime``), its vocabulary fits the model's embedding
  and is not a stub, and a probe sentence of plain English is not mostly unknown tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import RecipeError

MAX_CONFIG_BYTES = 4 << 20  # config.json / tokenizer_config.json; real ones are a few KB

# Files one of which a tokenizer needs (fast tokenizer, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

PROBE_TEXT = "The quick brown fox jumps over the lazy dog while the model reads this sentence."
MAX_UNKNOWN_FRACTION = 0.5  # of the probe's word pieces
MIN_VOCAB_FRACTION = 0.5  # of config.vocab_size


def read_json_object(path: Path, what: str = "") -> dict[str, Any]:
    """A small JSON file that must hold an object; every failure is one RecipeError naming it."""
    label = what or path.name
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the {label} ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a {label}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text; the {label} must be a JSON file") from None
    except ValueError as e:
        raise RecipeError(
            f"{path}: not valid JSON ({e}); restore the {label} from the model's source"
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the {label} must be a JSON object, got {type(data).__name__}")
    return data


def read_model_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face folder, checked (see the module docstring)."""
    if not folder.exists():
        raise RecipeError(f"model.source: {str(folder)!r} does not exist; give a Hugging Face model folder")
    if not folder.is_dir():
        raise RecipeError(f"model.source: {str(folder)!r} is a file, not a Hugging Face model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise RecipeError(
            f"model.source: {str(folder)!r} is not a Hugging Face model folder (no config.json)"
        )
    config = read_json_object(path, "model config")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise RecipeError(
            f"{path}: no model_type; a Transformers config names its model family (e.g. 'bert')"
        )
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise RecipeError(
            f"{path}: model_type {model_type!r} is not a model family this Transformers knows; "
            "a newer transformers may, but compressor never runs a model folder's own code"
        )
    refuse_remote_code(config, path)
    return config


def refuse_remote_code(config: dict[str, Any], path: Path) -> None:
    """Refuse a config that needs ``trust_remote_code`` (the folder's own Python modules)."""
    if config.get("auto_map"):
        names = config["auto_map"]
        shown = ", ".join(sorted(str(k) for k in names)) if isinstance(names, dict) else str(names)[:60]
        raise RecipeError(
            f"{path}: auto_map ({shown}) asks to run the model folder's own Python code "
            "(trust_remote_code); compressor refuses it: use a model family Transformers ships"
        )


def check_safetensors(folder: Path) -> list[Path]:
    """The folder's weight files, each header parsed by safetensors (never unpickled)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json_object(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RecipeError(f"{index}: no weight_map; the sharded checkpoint's index is damaged")
        files = []
        for name in sorted({str(v) for v in weight_map.values()}):
            shard = folder / name
            if Path(name).name != name or not shard.is_file():
                raise RecipeError(f"{index}: shard {name!r} is not a file in {folder}")
            files.append(shard)
    else:
        others = sorted(
            p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
        )
        found = f" (found {', '.join(others)})" if others else ""
        raise RecipeError(
            f"model.source: {str(folder)!r} has no model.safetensors{found}; pickle checkpoints (.bin, .pt) "
            "can run arbitrary code when loaded and are refused: convert them with safetensors first"
        )
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
            detail = " ".join(str(e).split())[:160]
            raise RecipeError(
                f"{path}: not a readable safetensors file ({detail}); the download is truncated or "
                "damaged: fetch the weights again"
            ) from None
    return files


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a text model folder without tokenizer files (Transformers would build a stub)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise RecipeError(
            f"model.source: {str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files from the model's source into the folder"
        )
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        refuse_remote_code(read_json_object(config_path, "tokenizer config"), config_path)


def load_tokenizer(folder: Path, config: dict[str, Any]) -> Any:
    """The folder's tokenizer, refused when it cannot encode real text for this model."""
    check_tokenizer_files(folder)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # a damaged tokenizer.json, a missing merges.txt, ...
        raise RecipeError(f"{folder}: the tokenizer does not load ({_one_line(e)})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None and not (folder / "tokenizer.json").is_file():
        raise RecipeError(
            f"{folder}: the tokenizer has no fast form (no tokenizer.json, and {type(tokenizer).__name__} "
            "does not convert to one); add the model's tokenizer.json to the folder"
        )
    check_tokenizer(tokenizer, folder, config)
    return tokenizer


def check_tokenizer(tokenizer: Any, folder: Path, config: dict[str, Any]) -> None:
    """A vocabulary that fits the embedding and is not a stub; a probe sentence mostly known."""
    size = len(tokenizer)
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int) and vocab_size > 0 and size < MIN_VOCAB_FRACTION * vocab_size:
        raise RecipeError(
            f"{folder}: the tokenizer has {size:,} tokens but config.json's vocab_size is {vocab_size:,}; "
            "this is not the model's tokenizer: copy its tokenizer files into the folder"
        )
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RecipeError(f"{folder}: the tokenizer turns a plain English sentence into no tokens")
    if isinstance(vocab_size, int) and max(ids) >= vocab_size:
        raise RecipeError(
            f"{folder}: the tokenizer produces token id {max(ids)} but the model's embedding has "
            f"{vocab_size} rows (config.json vocab_size); tokenizer and model do not match"
        )
    unk = tokenizer.unk_token_id
    if unk is not None:
        unknown = sum(i == unk for i in ids) / len(ids)
        if unknown > MAX_UNKNOWN_FRACTION:
            raise RecipeError(
                f"{folder}: the tokenizer maps {unknown:.0%} of a plain English sentence to its unknown "
                f"token {tokenizer.unk_token!r}; this is not a usable vocabulary for the model"
            )


def load_pretrained(cls: Any, folder: Path) -> nn.Module:
    """``cls.from_pretrained`` from safetensors only, no remote code, refusing a model that does
    not fit its file (a weight missing, so randomly initialised, or of another shape) or holds
    NaN / inf weights."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar; the CLI owns the terminal
    try:
        model, info = cls.from_pretrained(
            str(folder),
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported in ``info`` and refused below, by name
        )
    except Exception as e:  # shape mismatch (RuntimeError), bad config values (ValueError), ...
        raise RecipeError(f"{folder}: the model does not load from its weights ({_one_line(e)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = []
    for key, what in (("missing_keys", "missing from"), ("mismatched_keys", "of another shape in")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} weights {what} the file ({shown})")
    if problems:
        raise RecipeError(
            f"{folder}: the weights do not fit config.json: {'; '.join(problems)}; "
            "the model would run with randomly initialised layers"
        )
    check_finite(model, folder)
    return model


def check_finite(model: nn.Module, folder: Path) -> None:
    """Refuse NaN or infinite weights, naming the first tensor that holds one."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise RecipeError(
                    f"{folder}: weight {name} holds {bad:,} NaN or infinite values; the checkpoint is damaged"
                )


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
