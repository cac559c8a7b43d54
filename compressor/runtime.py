"""Run a compiled bundle from your own code: ``model = load("out/minilm-cpu-int8-cpu")``.

``load`` returns a callable built from the bundle alone: its ONNX model in ONNX Runtime and its
tokenizer (``tokenizer/tokenizer.json``) in Hugging Face ``tokenizers``, set up as the manifest's
``runtime`` section says (serving max length, pad token, padding side: what
``compressor.bundle_assets`` recorded at compile time and checked against the tokenizer the
compile used). Nothing else is needed: no torch, no transformers, no model folder. The only
compressor modules it imports are the manifest reader and the bundle's path checks, which are
standard library.

- an encoder bundle (``hf-encoder``): ``model(texts) -> float32 [N, D]`` sentence embeddings.
  The exported graph already outputs the mean-pooled, L2-normalised ``sentence_embedding``; a
  graph that outputs token states [N, T, D] is pooled here as the manifest's ``pooling`` says.
  Batches are padded to their longest text, so a text's embedding does not depend on the
  batch it is in.
- a causal LM bundle (``hf-causal-lm``): ``model(texts) -> LMOutput(logits [N, T, V] float32,
  attention_mask, input_ids)``, right-padded (a position's logits predict the next token).

What it loads is checked first: the bundle's own files only (no ``..``, no symlink), each listed
in ``manifest.json`` with the sha256 it has now, and the ONNX and tokenizer bytes that were hashed
are the bytes handed to ONNX Runtime and ``tokenizers`` (read once). Nothing is unpickled. Every
refusal is one ``BundleLoadError`` line naming the bundle and what to do.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from compressor.bundle import confined_path, files_table, relative_path
from compressor.errors import CompressorError
from compressor.manifest import MANIFEST, parse_manifest, read_manifest_bytes, sha256_file

RUNTIME = "runtime"  # the manifest section this module reads (written by compressor.bundle_assets)
ENCODER = "sentence-embedding"
CAUSAL_LM = "causal-lm"
KINDS = (ENCODER, CAUSAL_LM)
TOKENIZER_JSON = "tokenizer.json"
POOLING = {"method": "mean", "normalize": "l2"}  # what the hf-encoder adapter's embedding is
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class BundleLoadError(ValueError):
    """A folder ``load`` refuses: not a bundle, no tokenizer or ONNX model, or files that do not
    match the manifest. The message is one line naming the bundle and what to do."""


@dataclass(frozen=True)
class TokenizerSettings:
    """How the bundled tokenizer is run: truncation to ``max_length`` tokens (None: none), padding
    to the longest text of a batch with ``pad_id`` on ``padding_side``."""

    max_length: int | None
    pad_id: int
    pad_token: str
    pad_type_id: int = 0
    padding_side: str = "right"
    truncation_side: str = "right"

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "pad_id": self.pad_id,
            "pad_token": self.pad_token,
            "pad_type_id": self.pad_type_id,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> TokenizerSettings:
        if not isinstance(raw, dict):
            raise BundleLoadError(f"{where}: expected an object of tokenizer settings")

        def integer(key: str, minimum: int, optional: bool = False) -> Any:
            v = raw.get(key)
            if (v is None and optional) or (type(v) is int and v >= minimum):
                return v
            raise BundleLoadError(f"{where}.{key}: expected an integer >= {minimum}, got {v!r}")

        sides = {}
        for key in ("padding_side", "truncation_side"):
            sides[key] = raw.get(key, "right")
            if sides[key] not in ("left", "right"):
                raise BundleLoadError(f"{where}.{key}: {sides[key]!r} is not 'left' or 'right'")
        if not isinstance(raw.get("pad_token"), str):
            raise BundleLoadError(f"{where}.pad_token: expected the pad token's text")
        return cls(
            integer("max_length", 1, optional=True),
            integer("pad_id", 0),
            raw["pad_token"],
            integer("pad_type_id", 0),
            **sides,
        )


def configured_tokenizer(tokenizer_json: str, settings: TokenizerSettings) -> Any:
    """A ``tokenizers.Tokenizer`` from its JSON text, truncating and padding as ``settings`` say
    (whatever padding or truncation the JSON itself carries is replaced)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    if settings.max_length is not None:
        tok.enable_truncation(settings.max_length, direction=settings.truncation_side)
    tok.enable_padding(
        direction=settings.padding_side,
        pad_id=settings.pad_id,
        pad_type_id=settings.pad_type_id,
        pad_token=settings.pad_token,
    )
    return tok


def encode(tokenizer: Any, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [N, T], T the longest text)."""
    encs = tokenizer.encode_batch(list(texts), add_special_tokens=True)
    return {
        "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
    }


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("pass a list of strings: model(['a sentence', ...])")
    return list(texts)


class _Model:
    """The ONNX Runtime session and the tokenizer; the graph's inputs fed by name."""

    def __init__(self, path: Path, session: Any, tokenizer: Any, settings: TokenizerSettings) -> None:
        self.path = path
        self.session = session
        self.tokenizer = tokenizer
        self.max_length = settings.max_length
        self._inputs: list[tuple[str, Any]] = []
        for i in session.get_inputs():
            if i.name not in ("input_ids", "attention_mask", "token_type_ids"):
                raise BundleLoadError(
                    f"{path}: the ONNX graph takes an input {i.name!r} that a tokenizer does not produce; "
                    "runtime.load serves graphs of input_ids / attention_mask / token_type_ids"
                )
            if i.type not in _INT_TYPES:
                raise BundleLoadError(f"{path}: the ONNX input {i.name} is {i.type}, not an integer tensor")
            self._inputs.append((i.name, _INT_TYPES[i.type]))

    def _feeds(self, enc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: enc[name].astype(dtype, copy=False) for name, dtype in self._inputs}

    def _output(self, preferred: str, ranks: tuple[int, ...]) -> tuple[str, int]:
        outputs = {o.name: o for o in self.session.get_outputs()}
        name = preferred if preferred in outputs else next(iter(outputs))
        rank = len(outputs[name].shape)
        if rank not in ranks:
            raise BundleLoadError(f"{self.path}: the ONNX output {name} has rank {rank}, expected {ranks}")
        return name, rank


class SentenceEncoder(_Model):
    """``encoder(texts) -> float32 [N, D]``: the bundle's sentence embeddings."""

    def __init__(
        self, path: Path, session: Any, tokenizer: Any, settings: TokenizerSettings, pooling: Any
    ) -> None:
        super().__init__(path, session, tokenizer, settings)
        self.output, rank = self._output("sentence_embedding", (2, 3))
        self.pooled_in_graph = rank == 2  # the exported graph pools and normalises: not again here
        if not self.pooled_in_graph and pooling != POOLING:
            raise BundleLoadError(
                f"{path}: the manifest's pooling {pooling!r} is not mean + l2, the one served"
            )
        dim = next(o for o in self.session.get_outputs() if o.name == self.output).shape[-1]
        self.dim = dim if isinstance(dim, int) else None

    def __call__(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        texts = _texts(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be at least 1")
        parts = [self._embed(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        if not parts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        return np.concatenate(parts)

    def _embed(self, texts: list[str]) -> np.ndarray:
        enc = encode(self.tokenizer, texts)
        (out,) = self.session.run([self.output], self._feeds(enc))
        out = np.asarray(out, dtype=np.float32)
        if self.pooled_in_graph:
            return out
        mask = enc["attention_mask"][..., None].astype(np.float32)  # [N, T, 1]
        mean = (out * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)  # [N, D]
        return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class LMOutput(NamedTuple):
    logits: np.ndarray  # float32 [N, T, V]: position t predicts token t + 1
    attention_mask: np.ndarray  # int64 [N, T]: 1 for the text's tokens, 0 for padding
    input_ids: np.ndarray  # int64 [N, T]


class CausalLM(_Model):
    """``lm(texts) -> LMOutput``: next-token logits of the bundle's language model (no KV cache)."""

    def __init__(self, path: Path, session: Any, tokenizer: Any, settings: TokenizerSettings) -> None:
        super().__init__(path, session, tokenizer, settings)
        self.output, _ = self._output("logits", (3,))

    def __call__(self, texts: Sequence[str]) -> LMOutput:
        texts = _texts(texts)
        if not texts:
            raise ValueError("pass at least one text")
        enc = encode(self.tokenizer, texts)
        (logits,) = self.session.run([self.output], self._feeds(enc))
        return LMOutput(np.asarray(logits, dtype=np.float32), enc["attention_mask"], enc["input_ids"])


class _Bundle:
    """The manifest of ``root`` and its files table; hands out the bytes of listed files whose
    sha256 matches."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = f"{root / MANIFEST}"
        try:
            self.manifest = parse_manifest(read_manifest_bytes(root), self.where)
            self.files = files_table(self.manifest, self.where)
        except CompressorError as e:
            raise BundleLoadError(f"{e}; runtime.load takes a folder `compressor compile` wrote") from None
        self.real = root.resolve()

    def _listed(self, rel: str, what: str) -> tuple[Path, str]:
        try:
            rel = relative_path(rel, f"{self.where}: {what}")
            path, st = confined_path(self.real, rel, f"{self.where}: {what}")
        except CompressorError as e:
            raise BundleLoadError(f"{e}; restore the bundle or recompile") from None
        if rel not in self.files:
            raise BundleLoadError(f"{self.where}: {rel} is not listed in files (no sha256): refused")
        if not stat.S_ISREG(st.st_mode):
            raise BundleLoadError(f"{self.where}: {rel} is not a regular file")
        return path, self.files[rel][0]

    def _mismatch(self, rel: str) -> BundleLoadError:
        return BundleLoadError(
            f"{self.root}: {rel} does not match its sha256 in the manifest (changed or corrupt); "
            "restore the bundle or recompile"
        )

    def read(self, rel: str, what: str) -> bytes:
        path, sha = self._listed(rel, what)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise self._mismatch(rel)
        return data

    def check(self, rel: str, what: str) -> Path:
        """A listed file hashed in place (external data: ONNX Runtime opens it by path)."""
        path, sha = self._listed(rel, what)
        if sha256_file(path) != sha:
            raise self._mismatch(rel)
        return path


def _section(b: _Bundle) -> dict[str, Any]:
    section = b.manifest.get(RUNTIME)
    if section is None:
        model = b.manifest.get("model")
        adapter = model.get("adapter") if isinstance(model, dict) else None
        if adapter in ("hf-encoder", "hf-causal-lm"):
            raise BundleLoadError(
                f"{b.root}: the bundle has no tokenizer (compiled before bundles carried one); recompile it"
            )
        raise BundleLoadError(
            f"{b.root}: not a text-model bundle (adapter {adapter!r}); runtime.load serves bundles of "
            "the hf-encoder and hf-causal-lm adapters"
        )
    if not isinstance(section, dict) or section.get("kind") not in KINDS:
        raise BundleLoadError(f"{b.where}: runtime.kind: expected one of {', '.join(KINDS)}")
    if not isinstance(section.get("tokenizer"), dict):
        raise BundleLoadError(
            f"{b.root}: the bundle has no tokenizer (the compile's adapter held none); compile from a "
            "model folder that has its tokenizer files"
        )
    return section


def _load_tokenizer(b: _Bundle, section: dict[str, Any]) -> tuple[Any, TokenizerSettings]:
    info = section["tokenizer"]
    where = f"{b.where}: runtime.tokenizer"
    settings = TokenizerSettings.from_dict(info.get("settings"), f"{where}.settings")
    folder = info.get("folder")
    if not isinstance(folder, str):
        raise BundleLoadError(f"{where}.folder: expected the tokenizer's folder in the bundle")
    rel = f"{folder}/{TOKENIZER_JSON}"
    data = b.read(rel, "runtime.tokenizer")  # listed in files, and its sha256 matches
    sha, recorded = hashlib.sha256(data).hexdigest(), info.get("files")
    if isinstance(recorded, dict) and recorded.get(rel, sha) != sha:
        raise BundleLoadError(f"{where}.files: {rel}'s sha256 disagrees with the files table: refused")
    try:
        return configured_tokenizer(data.decode("utf-8"), settings), settings
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise BundleLoadError(f"{b.root}: {rel} is not a tokenizer tokenizers can read ({e})") from None


def _session(
    b: _Bundle, section: dict[str, Any], threads: int | None, providers: Sequence[Any] | None
) -> Any:
    onnx = section.get("onnx")
    if not isinstance(onnx, dict):
        raise BundleLoadError(
            f"{b.root}: the bundle has no ONNX model; add `- format: onnx` to the recipe's exports "
            "and recompile"
        )
    rel, external = onnx.get("file"), onnx.get("external_data", [])
    if not isinstance(rel, str) or not isinstance(external, list):
        raise BundleLoadError(f"{b.where}: runtime.onnx: expected a file and its external_data list")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        if type(threads) is not int or threads < 1:
            raise ValueError(f"threads: {threads!r} must be a positive integer")
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    base = os.path.dirname(rel)
    for loc in external:  # hashed here; ONNX Runtime then reads them beside the model, by path
        b.check(f"{base}/{loc}" if base else str(loc), "runtime.onnx.external_data")
    try:
        if external:
            model: Any = str(b.check(rel, "runtime.onnx"))
        else:
            model = b.read(rel, "runtime.onnx")  # the bytes hashed are the bytes loaded
        return ort.InferenceSession(model, so, providers=list(providers or ["CPUExecutionProvider"]))
    except BundleLoadError:
        raise
    except Exception as e:  # ONNX Runtime's own errors (a graph it cannot run, a provider it lacks)
        detail = " ".join(str(e).split())[:200]
        raise BundleLoadError(f"{b.root}: ONNX Runtime cannot load {rel} ({detail})") from None


def load(
    bundle_dir: str | os.PathLike[str], *, threads: int | None = None, providers: Sequence[Any] | None = None
) -> SentenceEncoder | CausalLM:
    """The bundle at ``bundle_dir`` as a callable: a ``SentenceEncoder`` or a ``CausalLM``.

    ``threads``: ONNX Runtime's intra-op threads (default: its own choice); ``providers``: its
    execution providers (default: the CPU). The files it loads are checked against the
    manifest first; raises ``BundleLoadError`` (one line) for a folder it cannot serve."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleLoadError(f"{root}: not a folder; give the folder `compressor compile --out` wrote")
    b = _Bundle(root)
    section = _section(b)
    tokenizer, settings = _load_tokenizer(b, section)
    session = _session(b, section, threads, providers)
    if section["kind"] == ENCODER:
        return SentenceEncoder(root, session, tokenizer, settings, section.get("pooling"))
    return CausalLM(root, session, tokenizer, settings)
