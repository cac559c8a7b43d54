"""`compressor verify`: what a bundle holds, whether its paths, hashes and signature check
out, and what ``compressor bench`` would load from it."""

from __future__ import annotations

from pathlib import Path

from compressor.app.engines import ARTIFACT_KINDS, CODE_ENGINES, ENGINE_ARTIFACTS
from compressor.bundle import check_bundle
from compressor.trust import Trust, decide_trust


def describe_bundle(bundle: Path, explicit: bool = False) -> tuple[Trust, list[dict[str, str]], int, str]:
    """``compressor verify``: check paths and hashes (raises one line on a problem), then the
    signature; returns the trust decision, one row per artifact (what loads it, whether that
    is data or code, whether ``compressor bench`` would load it), the number of files and the
    recipe's model source (what bench loads as the original model)."""
    checked = check_bundle(bundle)
    trust = decide_trust(bundle, checked.manifest_bytes, explicit)
    rows = []
    for art, rel in checked.manifest.get("artifacts", {}).items():
        engines = [n for n, a in ENGINE_ARTIFACTS.items() if a == art]
        code = [n for n in engines if n in CODE_ENGINES]
        if not engines:
            loads = "- (no bench engine loads it)"
        elif code and not trust.trusted:
            loads = "no: not trusted (--trust)"
        else:
            loads = "yes"
        kind = ARTIFACT_KINDS.get(art, "folder" if (Path(bundle) / rel).is_dir() else "file")
        rows.append(
            {"artifact": art, "path": rel, "kind": kind, "engines": ", ".join(engines) or "-", "loads": loads}
        )
    recipe = checked.manifest.get("recipe")
    model = recipe.get("model") if isinstance(recipe, dict) else None
    source = model.get("source") if isinstance(model, dict) else None
    if not isinstance(recipe, dict):
        source_line = "unknown: the manifest has no recipe object (bench refuses this bundle)"
    else:
        source_line = str(source if source is not None else "default")
    return trust, rows, len(checked.manifest.get("files", {})), source_line
