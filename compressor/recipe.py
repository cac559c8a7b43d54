"""Typed recipes: YAML in, frozen dataclasses out, unknown keys rejected.

A recipe names a model, a target and an ordered list of passes, then the exports and
the evaluation settings::

    name: minilm-cpu-int8
    model: {source: default}
    target: cpu
    passes:
      - pass: quantize
        method: int8
        targets: ["*"]
    exports:
      - format: onnx

Each pass entry is ``pass: NAME`` plus that pass's own options; the options are
checked against the pass's config dataclass, so a misspelt key fails with its path
(``passes[0].bitz: unknown key; allowed keys here: ...``). Shipped recipes live in
``compressor/recipes/`` and are found by name.

A recipe file is untrusted input and is read within bounds (``compressor.recipe_yaml``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from compressor.config import SERVING_BATCH_SIZES, from_dict, option, show, show_key, to_dict
from compressor.errors import RecipeError
from compressor.recipe_yaml import load_yaml, read_recipe_text

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ModelSpec:
    source: str = option(
        "default", help="'default' (the packaged all-MiniLM-L6-v2) or a path to a Hugging Face model folder"
    )
    adapter: Literal["auto", "hf-encoder", "hf-causal-lm", "diffusers"] = option(
        "auto",
        help="the model family adapter; 'auto' picks from the model's config (a *ForCausalLM architecture: "
        "hf-causal-lm, else hf-encoder); 'diffusers' = a class-conditional diffusers pipeline folder",
    )


@dataclass(frozen=True)
class DataSpec:
    corpus: Literal["broad-text", "stdlib-docstrings", "sklearn-digits"] = option(
        "broad-text",
        help="real data shipped on every machine, used when no `source` is given: broad-text = Python "
        "standard library docstrings and the Python reference's prose (calibration, training and held-out "
        "evaluation) plus scikit-learn's dataset descriptions (a whole domain held out for evaluation only); "
        "stdlib-docstrings = the docstrings alone; sklearn-digits = scikit-learn's 8x8 digits (images, "
        "for the diffusers adapter)",
    )
    source: str | None = option(
        None,
        help="your own data instead of the corpus: a text file (one example per line), a .jsonl / .csv / "
        ".parquet file (the `field` column), a folder written by datasets' save_to_disk, or for the "
        "diffusers adapter an image folder (class subfolders, or image + .txt caption pairs); split into "
        "calibration / train / held-out eval by a hash of each example",
    )
    field: str = option(
        "text", help="the column of a .jsonl / .csv / .parquet / datasets source that holds the text"
    )
    calibration_source: str | None = option(
        None, help="a separate source for the calibration split (same formats as `source`)"
    )
    train_source: str | None = option(None, help="a separate source for the training (distillation) split")
    eval_source: str | None = option(
        None, help="a separate source for the held-out evaluation split (never calibrated or trained on)"
    )
    calibration_samples: int = option(
        256, help="texts used to calibrate quantization and importance scores", le=100_000
    )
    train_samples: int = option(2048, help="texts used for distillation (recovery)")
    wide_train: bool = option(
        False,
        help="stdlib corpora: draw the distillation docstrings from every library source file of the "
        "standard library, not only the listed modules (train-split paragraphs only; calibration and "
        "held-out texts unchanged): 6,304 instead of 3,548 on Python 3.11",
    )
    eval_samples: int = option(
        512, help="held-out texts used for fidelity (per evaluation domain)", le=100_000
    )
    max_length: int | None = option(
        None,
        help="token length the texts are truncated to; default: the model's serving length "
        "(sentence-transformers' max_seq_length, else the tokenizer's and position table's limit)",
        le=131_072,
    )
    long_fraction: float = option(
        0.25,
        help="share of calibration and evaluation examples built from consecutive texts of one "
        "domain joined up to the serving length, so the long inputs the model serves are covered",
        ge=0.0,
        le=1.0,
    )
    batch_size: int = option(32, help="batch size for calibration, distillation and evaluation", le=65_536)
    group_by_length: bool = option(
        True,
        help="distillation batches hold texts of similar token length (batch order shuffled by the seed), "
        "so steps are not spent on padding; false batches the texts in their sampled order",
    )

    def validate(self, path: str) -> None:
        for name in ("calibration_samples", "eval_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{path}.{name}: must be at least 1")
        if self.max_length is not None and self.max_length < 1:
            raise RecipeError(f"{path}.max_length: must be at least 1")
        if self.train_samples < 0:
            raise RecipeError(f"{path}.train_samples: must not be negative")
        if self.wide_train and self.corpus == "sklearn-digits":
            raise RecipeError(f"{path}.wide_train: only the text corpora have more training text")
        for name in ("source", "calibration_source", "train_source", "eval_source"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise RecipeError(f"{path}.{name}: is empty; give a file or folder path, or leave it out")
        if self.source is None and self.calibration_source is None and self.train_source is None:
            if self.eval_source is not None:
                raise RecipeError(
                    f"{path}.eval_source: needs `source` or `calibration_source` too (the data to calibrate on)"
                )


@dataclass(frozen=True)
class BenchSpec:
    batch_sizes: tuple[int, ...] = option(
        SERVING_BATCH_SIZES, help="batch sizes timed by `compressor bench`", ge=1, le=65_536, max_items=32
    )
    seq_len: int = option(128, help="sequence length of the timed inputs", ge=1, le=131_072)
    threads: int = option(2, help="intra-op threads for ONNX Runtime", ge=1, le=1024)
    warmup: int = option(3, help="untimed runs before timing", le=100_000)
    repeats: int = option(20, help="timed runs per setting", ge=1, le=100_000)


@dataclass(frozen=True)
class EvaluationSpec:
    min_mean_cosine: float | None = option(
        None,
        help="fail the compile when the final model's mean cosine vs the teacher is below this "
        "(adapters that report mean_cosine: hf-encoder, hf-causal-lm, module; any family: headline_limit)",
        ge=0.0,
        le=1.0,
    )
    headline_limit: float | None = option(
        None,
        help="fail the compile when the final model's headline fidelity metric is worse than this: below it "
        "for a metric where higher is better (hf-encoder, module: mean_cosine), above it where lower is "
        "better (hf-causal-lm: perplexity_ratio; diffusers: fd, the Frechet distance to real held-out images)",
        ge=0.0,
    )
    bench: BenchSpec = option(BenchSpec(), help="settings for the benchmark run after export")
    run_bench: bool = option(True, help="time the exported bundle at the end of the compile")


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: Any  # the pass's own frozen config dataclass


@dataclass(frozen=True)
class ExportSpec:
    format: str
    config: Any


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model: ModelSpec
    target: str
    seed: int
    data: DataSpec
    passes: tuple[PassSpec, ...]
    exports: tuple[ExportSpec, ...]
    evaluation: EvaluationSpec
    source: str = "<memory>"  # where it was read from, for error messages

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "model": to_dict(self.model),
            "target": self.target,
            "seed": self.seed,
            "data": to_dict(self.data),
            "passes": [{"pass": p.name, **to_dict(p.config)} for p in self.passes],
            "exports": [{"format": e.format, **to_dict(e.config)} for e in self.exports],
            "evaluation": to_dict(self.evaluation),
        }

    def with_target(self, target: str) -> Recipe:
        return dataclasses.replace(self, target=target)

    def with_model(self, source: str) -> Recipe:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, source=source))


def _is_folder_name(name: str) -> bool:
    """Whether ``name`` can name the bundle folder out/NAME-TARGET: no path separators, no
    leading dot (so no ".."), no control characters."""
    return (
        0 < len(name) <= 100
        and not name.startswith(".")
        and not any(c in "/\\" or not c.isprintable() for c in name)
    )


_TOP_KEYS = ("name", "description", "model", "target", "seed", "data", "passes", "exports", "evaluation")


def _parse_entries(items: Any, key: str, name_key: str, registry: Mapping[str, Any], what: str) -> list:
    if items is None:
        return []
    if not isinstance(items, list):
        raise RecipeError(f"{key}: expected a list of {what} entries, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        if not isinstance(item, Mapping) or name_key not in item:
            raise RecipeError(f"{path}: each entry needs a '{name_key}:' key naming the {what}")
        name = item[name_key]
        if not isinstance(name, str) or name not in registry:
            raise RecipeError(
                f"{path}.{name_key}: unknown {what} {show(name)}; known: {', '.join(sorted(registry))}"
            )
        options = {k: v for k, v in item.items() if k != name_key}
        cls = registry[name]
        parse = getattr(cls, "config_from_dict", None)  # a pass whose config depends on its options
        out.append((name, parse(options, path) if parse else from_dict(cls.Config, options, path)))
    return out


def parse_recipe(data: Any, source: str = "<memory>") -> Recipe:
    """Build a Recipe from parsed YAML; every error names ``source`` and the bad key."""
    from compressor.exporters import EXPORTERS
    from compressor.passes import PASSES
    from compressor.targets import TARGETS

    try:
        if not isinstance(data, Mapping):
            raise RecipeError("the recipe must be a mapping with keys " + ", ".join(_TOP_KEYS))
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise RecipeError(
                f"{show_key(unknown[0])}: unknown key; allowed top-level keys: {', '.join(_TOP_KEYS)}"
            )
        name = data.get("name", Path(source).stem)
        if not isinstance(name, str):
            raise RecipeError(f"name: expected a string, got {show(name)}")
        if "name" in data and not _is_folder_name(name):
            raise RecipeError(
                f"name: {show(name)} cannot name a bundle folder; use 1 to 100 characters without '/', "
                "'\\' or control characters, not starting with '.'"
            )
        target = data.get("target", "cpu")
        if not isinstance(target, str) or target not in TARGETS:
            raise RecipeError(f"target: unknown target {show(target)}; known: {', '.join(TARGETS)}")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecipeError(f"seed: expected an integer, got {show(seed)}")
        if not 0 <= seed <= MAX_SEED:
            raise RecipeError(f"seed: {show(seed)} is out of range (allowed: 0 to {MAX_SEED:,})")
        description = data.get("description", "")
        if not isinstance(description, (str, int, float)) and description is not None:
            raise RecipeError(f"description: expected a string, got {type(description).__name__}")
        passes = _parse_entries(data.get("passes"), "passes", "pass", PASSES, "pass")
        exports = _parse_entries(data.get("exports"), "exports", "format", EXPORTERS, "export format")
        return Recipe(
            name=name,
            description="" if description is None else str(description),
            model=from_dict(ModelSpec, data.get("model"), "model"),
            target=target,
            seed=seed,
            data=from_dict(DataSpec, data.get("data"), "data"),
            passes=tuple(PassSpec(n, c) for n, c in passes),
            exports=tuple(ExportSpec(n, c) for n, c in exports),
            evaluation=from_dict(EvaluationSpec, data.get("evaluation"), "evaluation"),
            source=source,
        )
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def shipped_recipes() -> dict[str, str]:
    """Names of the recipes that ship inside the package, mapped to their YAML text."""
    folder = resources.files("compressor") / "recipes"
    return {
        p.name.removesuffix(".yaml"): p.read_text(encoding="utf-8")
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``minilm-cpu-int8``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        text, source = read_recipe_text(path), str(path)
        base = path.resolve().parent
    else:
        shipped = shipped_recipes()
        if str(name_or_path) not in shipped:
            raise RecipeError(
                f"unknown recipe {str(name_or_path)!r}: not a file, and not one of the shipped recipes "
                f"({', '.join(sorted(shipped))})"
            )
        text, source = shipped[str(name_or_path)], f"{name_or_path}.yaml"
        base = SHIPPED_BASE
    return _resolve_model_source(parse_recipe(load_yaml(text, source), source), base)


# A shipped recipe's relative model.source names a folder of the project checkout (the one
# holding compressor/ and benchmarks/): benchmarks/.cache/digits-teacher is where
# benchmarks/train_digits_teacher.py writes, wherever the command runs.
SHIPPED_BASE = Path(__file__).resolve().parent.parent


def _resolve_model_source(recipe: Recipe, base: Path) -> Recipe:
    """A relative ``model.source`` and relative data sources resolved against ``base`` (the
    recipe file's folder; the checkout for shipped recipes), not the current directory;
    ``default`` stays as it is."""
    data = recipe.data
    paths: dict[str, Any] = {
        name: str((base / value).resolve())
        for name in ("source", "calibration_source", "train_source", "eval_source")
        if (value := getattr(data, name)) is not None and not Path(value).is_absolute()
    }
    if paths:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(data, **paths))
    src = recipe.model.source
    if src == "default" or Path(src).is_absolute():
        return recipe
    return recipe.with_model(str((base / src).resolve()))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
