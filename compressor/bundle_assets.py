"""What a text model's bundle carries besides its exports, so that ``compressor.runtime`` serves it.

A bundle's ONNX takes token ids; a caller holds text. ``write_runtime_assets`` puts the model's
own tokenizer into ``BUNDLE/tokenizer/`` and writes the manifest's ``runtime`` section, for the
adapters that read text (``hf-encoder``, ``hf-causal-lm``):

- the tokenizer files of the folder the adapter's tokenizer was loaded from, by a fixed
  allow-list of the names Transformers writes (never any other file of the folder), plus a
  causal LM's ``generation_config.json``;
- a ``tokenizer.json`` (what ``tokenizers`` alone runs) always: the folder's own when it
  tokenizes exactly as the compile's tokenizer did, else one saved from Transformers' fast
  tokenizer (a folder of slow-tokenizer files: ``vocab.txt``, ``merges.txt``, ...);
- how it is run: the serving max length (sentence-transformers' ``max_seq_length`` when the
  folder has ``sentence_bert_config.json``, else the smaller of the tokenizer's
  ``model_max_length`` and the model's ``max_position_embeddings``), the pad token and sides;
  checked at compile time on probe texts: ``tokenizers`` with these settings must give the ids
  and masks Transformers gives, or the compile fails (``ExportError``);
- for encoders the pooling (mean over the attention mask, then L2), and which ONNX artifact the
  runtime loads with the external-data files it names.

The files land in the bundle like any other: hashed into ``files`` when the bundle is
finalised, and ``tokenizer`` is a folder artifact, so ``check_bundle`` refuses a changed file
or one added there, and ``compressor.runtime`` checks the sha256 of what it loads.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from compressor.adapters.base import ModelAdapter
from compressor.adapters.hf_folder import PROBE_TEXT, read_json_object
from compressor.bundle import BundleWriter, onnx_external_files
from compressor.errors import CompressorError, ExportError, RecipeError
from compressor.manifest import sha256_file
from compressor.runtime import (
    CAUSAL_LM,
    ENCODER,
    POOLING,
    RUNTIME,
    TOKENIZER_JSON,
    TokenizerSettings,
    configured_tokenizer,
    encode,
)

log = logging.getLogger(__name__)

FOLDER = "tokenizer"  # in the bundle; also its artifact name
# The files Transformers reads a tokenizer from: fast (tokenizer.json), WordPiece, BPE,
# SentencePiece, and the configs and chat templates beside them. Nothing else is copied.
TOKENIZER_FILES = (
    TOKENIZER_JSON,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
MAX_FILE_BYTES = 256 << 20  # the largest real tokenizer.json files are tens of MB
# the adapters whose bundles the runtime serves, and as what
RUNTIME_KINDS = {"hf-encoder": ENCODER, "hf-causal-lm": CAUSAL_LM}
_UNBOUNDED = 10**9  # Transformers' "no model_max_length" is 1e30
_PROBES = (
    PROBE_TEXT,
    "Hello, world!",
    "  Leading and trailing spaces,\ttabs and\nnew lines.  ",
    "Numbers 3.14159 and 2,718; mail a.b@example.com; https://example.com/x?y=1&z=%20.",
    "Accents café naïve Zürich, CJK 東京, emoji 🙂, symbols ±∞ — “quotes”.",
    "def f(x):\n    return x ** 2  # Python",
    "A",
)


def write_runtime_assets(adapter: ModelAdapter, model: nn.Module | None, bundle: BundleWriter) -> None:
    """For a text adapter: the tokenizer into ``BUNDLE/tokenizer/`` and the manifest's ``runtime``
    section (see the module docstring); nothing for other adapters. Call after the exports."""
    kind = RUNTIME_KINDS.get(adapter.name)
    if kind is None:
        return
    assert bundle.path is not None
    section: dict[str, Any] = {"kind": kind, "tokenizer": None}
    if kind == ENCODER:
        section["pooling"] = dict(POOLING)
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is None:
        log.warning("the adapter holds no tokenizer: the bundle carries none (compressor.runtime refuses it)")
    else:
        section["tokenizer"] = bundle_tokenizer(tokenizer, kind, model, bundle.path)
        bundle.add_artifacts({"tokenizer": FOLDER})
        if (bundle.path / FOLDER / GENERATION_CONFIG).is_file():
            section["generation_config"] = f"{FOLDER}/{GENERATION_CONFIG}"
    section["onnx"] = _onnx_entry(bundle.manifest.artifacts, bundle.path)
    bundle.manifest.extra[RUNTIME] = section


def _onnx_entry(artifacts: dict[str, str], out: Path) -> dict[str, Any] | None:
    """The ONNX the runtime loads (ONNX Runtime's flavour first) and its external-data files."""
    for key in ("onnx", "onnx_qdq"):
        if key in artifacts:
            rel = artifacts[key]
            return {"artifact": key, "file": rel, "external_data": onnx_external_files(out / rel)}
    return None


def bundle_tokenizer(tokenizer: Any, kind: str, model: nn.Module | None, out: Path) -> dict[str, Any]:
    """Copy the tokenizer files into ``out/tokenizer``, make sure its ``tokenizer.json`` runs as
    ``tokenizer`` (the compile's) does, and return the manifest's ``runtime.tokenizer``."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "")))
    dest = out / FOLDER
    dest.mkdir()
    names = TOKENIZER_FILES + ((GENERATION_CONFIG,) if kind == CAUSAL_LM else ())
    copied = [n for n in names if folder.is_dir() and (folder / n).is_file()]
    for name in copied:
        _copy(folder / name, dest / name)
    max_length, why = serving_max_length(folder, tokenizer, model, kind)
    settings = tokenizer_settings(tokenizer, max_length)
    how = "copied from the model folder"
    problem = _disagreement(dest / TOKENIZER_JSON, tokenizer, settings) if TOKENIZER_JSON in copied else ""
    if TOKENIZER_JSON not in copied or problem:
        how = "saved from Transformers' fast tokenizer" + (
            f" (the folder's own tokenizes differently: {problem})" if problem else ""
        )
        (dest / TOKENIZER_JSON).write_text(fast_tokenizer_json(tokenizer, folder), encoding="utf-8")
        problem = _disagreement(dest / TOKENIZER_JSON, tokenizer, settings)
        if problem:
            raise ExportError(
                f"{folder}: the bundled {TOKENIZER_JSON} does not tokenize as the model's tokenizer ({problem}); "
                "the bundle was not written"
            )
    return {
        "folder": FOLDER,
        "source": str(folder),
        "files": {f"{FOLDER}/{p.name}": sha256_file(p) for p in sorted(dest.iterdir())},
        "tokenizer_json": how,
        "settings": settings.to_dict(),
        "max_length_from": why,
        "checked": f"{len(_probes(max_length))} probe texts tokenize as Transformers does",
    }


def _copy(src: Path, dst: Path) -> None:
    size = src.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RecipeError(f"{src}: {size:,} bytes, larger than a tokenizer file ({MAX_FILE_BYTES >> 20} MiB)")
    shutil.copyfile(src, dst)  # follows a link (a Hugging Face cache folder links its files)


def serving_max_length(
    folder: Path, tokenizer: Any, model: nn.Module | None, kind: str
) -> tuple[int | None, str]:
    """The longest input the model serves, in tokens, and where that number comes from."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int) and (folder / "config.json").is_file():
        positions = read_json_object(folder / "config.json", "model config").get("max_position_embeddings")
    positions = positions if type(positions) is int and positions > 0 else None
    st = folder / "sentence_bert_config.json"
    if kind == ENCODER and st.is_file():
        seq = read_json_object(st, "sentence-transformers config").get("max_seq_length")
        if type(seq) is int and seq > 0:
            if positions is not None and positions < seq:
                return positions, f"{st.name} max_seq_length {seq}, capped at max_position_embeddings"
            return seq, f"{st.name} max_seq_length"
    limits: list[tuple[Any, str]] = [
        (getattr(tokenizer, "model_max_length", None), "tokenizer model_max_length")
    ]
    limits.append((positions, "max_position_embeddings"))
    known = [(v, what) for v, what in limits if type(v) is int and 0 < v < _UNBOUNDED]
    if not known:
        return None, "neither model_max_length nor max_position_embeddings is set: no truncation"
    return min(known)


def tokenizer_settings(tokenizer: Any, max_length: int | None) -> TokenizerSettings:
    """How the runtime pads and truncates: as the compile's tokenizer did (a causal LM adapter
    pads with the end-of-sequence token when the tokenizer has no pad token)."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token is None:
        raise CompressorError(
            f"{tokenizer.name_or_path}: the tokenizer has no pad token; set pad_token in tokenizer_config.json"
        )
    return TokenizerSettings(
        max_length=max_length,
        pad_id=int(tokenizer.pad_token_id),
        pad_token=str(tokenizer.pad_token),
        pad_type_id=int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        padding_side=str(getattr(tokenizer, "padding_side", "right")),
        truncation_side=str(getattr(tokenizer, "truncation_side", "right")),
    )


def fast_tokenizer_json(tokenizer: Any, folder: Path) -> str:
    """``tokenizer.json`` of Transformers' fast tokenizer, without the padding or truncation a
    call left set on it (the runtime sets its own)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"{folder}: the tokenizer has no fast form to save as {TOKENIZER_JSON}; add the model's "
            f"{TOKENIZER_JSON} to the folder"
        )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    tok.no_truncation()
    return str(tok.to_str())


def _probes(max_length: int | None) -> list[str]:
    """Real-text probes, one long enough to be truncated at ``max_length`` (up to a bound)."""
    repeats = min((max_length or 64) // 8 + 2, 600)
    return [*_PROBES, " ".join([PROBE_TEXT] * repeats)]


def _disagreement(path: Path, tokenizer: Any, settings: TokenizerSettings) -> str:
    """'' when ``tokenizers`` on ``path`` with ``settings`` gives what ``tokenizer`` gives on the
    probes (ids, mask, token types) in one padded batch; else what differs first."""
    probes = _probes(settings.max_length)
    try:
        ours = encode(configured_tokenizer(path.read_text(encoding="utf-8"), settings), probes)
    except Exception as e:  # a tokenizer.json that tokenizers cannot read
        return f"tokenizers cannot read it: {' '.join(str(e).split())[:120]}"
    truncate = settings.max_length is not None
    ref = tokenizer(probes, padding=True, truncation=truncate, max_length=settings.max_length)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key not in ref:
            continue
        theirs = ref[key]
        if ours[key].shape != (len(theirs), len(theirs[0])):
            return f"{key} of shape {ours[key].shape}, Transformers gives {len(theirs)}x{len(theirs[0])}"
        for text, a, b in zip(probes, ours[key].tolist(), theirs, strict=True):
            if a != list(b):
                return f"{key} differ on {text[:40]!r}"
    return ""
