"""Decoder LM bundles in ``compressor bench``: prefill latency and decode time per token, in
ONNX Runtime GenAI, side by side with the float model.

The bundle's ``onnx_genai`` folder (engine ``genai``) and the baseline ``ort_fp32`` (the
original model written the same way in float: the plain export with a KV cache a user would
make) are timed by GenAI's own generator in rotation, so a noisy machine slows both alike.
Each turn gives each engine a fresh generator, appends the prompt (real held-out text cut to
``seq_len`` tokens, batch 1: the **prefill**, timed), then generates ``decode_tokens`` tokens
one at a time (each timed: **decode per token**, the attention over the cache included).
End of text is suppressed until then (``min_length``), so every engine generates as many
tokens. The first turn of each engine, and the first new token of each turn, are not timed.
Each engine's greedy tokens are compared
with the baseline's (``first_divergence``); the logits' fidelity is the compile's, in the
manifest (``verification.onnx_genai``).

A folder's ``genai_config.json`` is read before GenAI loads it: a ``custom_ops_library``, an
execution provider or a model file outside the folder would load code or files the bundle
names, so on an untrusted bundle they are refused.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from compressor.errors import CompressorError
from compressor.trust import Trust

ENGINE = "genai"
BASELINE = "ort_fp32"
SAFE_SESSION_OPTIONS = frozenset(
    {"log_id", "provider_options", "intra_op_num_threads", "inter_op_num_threads"}
)


def check_genai_folder(folder: Path, trust: Trust) -> dict[str, Any]:
    """The folder's ``genai_config.json``, refused (one line) where an untrusted bundle's config
    would make GenAI load code or read outside the folder."""
    where = f"{folder.name}/genai_config.json"
    try:
        config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        filename, options = decoder["filename"], decoder.get("session_options", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompressorError(f"bench: {where} is missing or malformed ({e}); recompile the bundle") from e
    name = PurePosixPath(str(filename))
    if name.is_absolute() or ".." in name.parts or len(name.parts) != 1:
        raise CompressorError(
            f"bench: {where}: decoder.filename {filename!r} is not a file inside the folder"
        )
    if not trust.trusted:
        odd = sorted(set(options) - SAFE_SESSION_OPTIONS)
        providers = options.get("provider_options") or []
        if odd or providers:
            what = ", ".join(odd) or f"provider_options {providers}"
            raise CompressorError(
                f"bench: {where} sets {what}, which can load code; {trust.refusal('its GenAI config loads code')}"
            )
    return dict(config)


def _genai_model(folder: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def _turn(model: Any, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
    """One generation: the prefill's seconds, each new token's seconds, the new tokens."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.array([prompt], dtype=np.int32))  # the prompt's forward: the first token's logits
    prefill = time.perf_counter() - t0
    steps = []
    while not gen.is_done():
        t0 = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t0)
    return prefill, steps[1:], [int(t) for t in gen.get_sequence(0)][len(prompt) :]


def held_out_prompt(tokenizer: Any, length: int) -> list[int]:
    """``length`` tokens of held-out text (``compressor.text_data.held_out_texts``, one text after
    another until there are enough), the first one's special tokens kept."""
    from compressor.text_data import held_out_texts

    ids: list[int] = []
    for n in (8, 64, 512):
        ids = []
        for i, text in enumerate(held_out_texts(n, 1, length)):
            ids += tokenizer(text, add_special_tokens=i == 0)["input_ids"]
            if len(ids) >= length:
                return ids[:length]
    raise CompressorError(f"bench: the held-out text has only {len(ids)} tokens; use a --seq-len below that")


def bench_lm_bundle(bundle: Path, manifest: dict[str, Any], recipe: Any, adapter: Any, cfg: Any,
                    trust: Trust) -> dict[str, Any]:  # fmt: skip
    """``compressor bench`` for a decoder LM bundle (the module says what is timed)."""
    from compressor.app.timing import latency_stats
    from compressor.exporters.onnx.onnx_genai import write_genai_folder

    artifacts = manifest.get("artifacts", {})
    if "onnx_genai" not in artifacts:
        raise CompressorError(
            f"bench: {bundle} is a decoder LM bundle without an onnx_genai folder; add `- format: onnx_genai` "
            "to its recipe's exports to time prefill and decode"
        )
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise CompressorError(
            "bench: timing a decoder LM needs ONNX Runtime GenAI (pip install onnxruntime-genai)"
        ) from e
    folder = bundle / artifacts["onnx_genai"]
    check_genai_folder(folder, trust)
    original = adapter.load(recipe.model.source).eval()  # and its tokenizer
    prompt = held_out_prompt(adapter.tokenizer, cfg.seq_len)
    status: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="compressor-bench-") as tmp:
        base = Path(tmp) / "genai_fp32"
        base.mkdir()
        write_genai_folder(original, adapter, base)
        folders = {BASELINE: base, ENGINE: folder}
        labels = {BASELINE: "original model, float ONNX with KV cache, ONNX Runtime GenAI", ENGINE: "bundle onnx_genai folder, ONNX Runtime GenAI"}  # fmt: skip
        models = {}
        for name, path in folders.items():
            t0 = time.perf_counter()
            models[name] = _genai_model(path, cfg.threads)
            status[name] = {"status": "ok", "label": labels[name], "timed": "rotated",
                            "load_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
        prefill: dict[str, list[float]] = {n: [] for n in models}
        decode: dict[str, list[float]] = {n: [] for n in models}
        tokens: dict[str, list[int]] = {}
        for turn in range(max(1, cfg.warmup) + cfg.repeats):
            for name, model in models.items():
                p, steps, new = _turn(model, prompt, cfg.decode_tokens)
                tokens.setdefault(name, new)
                if turn >= max(1, cfg.warmup):
                    prefill[name].append(p)
                    decode[name] += steps
    rows = []
    for phase, times, length in (("prefill", prefill, len(prompt)), ("decode per token", decode, 1)):
        stats = {n: latency_stats(t, 1) for n, t in times.items()}
        for s in stats.values():
            s[f"speedup_vs_{BASELINE}"] = round(stats[BASELINE]["median_ms"] / s["median_ms"], 3)
        rows.append({"phase": phase, "batch": 1, "seq_len": length, "engines": stats})
    ref = tokens[BASELINE]
    diverge = next((i for i, (a, b) in enumerate(zip(tokens[ENGINE], ref, strict=True)) if a != b), None)
    status[ENGINE]["greedy_vs_baseline"] = {"new_tokens": len(ref), "first_divergence": diverge}
    return {
        "device": "cpu", "threads": cfg.threads, "seq_len": len(prompt), "decode_tokens": cfg.decode_tokens,
        "trust": trust.to_dict(), "baseline": BASELINE, "latency": rows, "engines": status,
        "runtime": f"onnxruntime-genai {onnxruntime_genai.__version__}",
    }  # fmt: skip
