"""Loading a diffusion model from a folder: a teacher (a diffusers pipeline folder) or an
exported student (a ``StepReducedPipeline`` folder), safetensors weights only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from compressor.adapters.diffusion.builders import from_class_unet, from_dit, from_text_denoiser
from compressor.adapters.diffusion.model import DENOISERS, DiffusionModel, SamplingSpec
from compressor.adapters.diffusion.schedule import NoiseSchedule, _diffusers, training_schedule
from compressor.adapters.diffusion.step_reduced_pipeline import StepReducedPipeline
from compressor.adapters.digits import DIGIT_PROMPTS
from compressor.errors import DataError


def _read_sampling(folder: Path) -> SamplingSpec:
    path = folder / "sampling.json"
    return SamplingSpec(**json.loads(path.read_text())) if path.exists() else SamplingSpec()


def encode_prompts(
    text_encoder: str | Path,
    prompts: Sequence[str],
    max_length: int = 16,
    tokenizer: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (P, max_length, D) and pooled embeddings (P, D) of ``prompts`` from a
    local Hugging Face encoder folder (last hidden state; pooled = mean over real tokens)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer or text_encoder))
    enc = safe_from_pretrained(AutoModel, Path(text_encoder)).eval()
    batch = tok(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return hidden, pooled


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def safe_from_pretrained(cls: Any, folder: Path) -> Any:
    """``cls.from_pretrained(folder, use_safetensors=True)``: pickle checkpoints (``.bin``) can
    run code when loaded, so a folder without safetensors weights is refused by name; any
    other failure to build the model from the folder (a malformed config, weights that do
    not fit it) is one line naming the folder."""
    try:
        return cls.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        pickles = sorted(p.name for p in Path(folder).rglob("*.bin"))
        if pickles or not any(Path(folder).rglob("*.safetensors")):
            found = f" (found pickle checkpoints {', '.join(pickles)})" if pickles else ""
            raise DataError(
                f"{folder}: could not load safetensors weights{found}; pickle checkpoints can run code when "
                f"loaded and are refused: convert them to .safetensors ({_one_line(e)})"
            ) from None
        raise DataError(
            f"{folder}: could not build a {getattr(cls, '__name__', cls)} from this folder "
            f"(its config.json or weights are malformed): {_one_line(e)}"
        ) from None


def _config_json(path: Path) -> dict[str, Any]:
    """A component's ``config.json`` as a dict, or one line saying what is wrong with it."""
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"{path}: cannot read the denoiser config ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _training_config(d: Any, folder: Path) -> dict[str, Any]:
    try:
        config = training_schedule(dict(d.DDPMScheduler.load_config(folder)))
        NoiseSchedule(config)  # its values build a schedule (a number where one belongs)
        return config
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{folder}: malformed scheduler config ({_one_line(e)})") from None


# Where benchmarks/train_digits_teacher.py writes its teachers, as the shipped recipes name them.
DIGITS_TEACHER_HINT = (
    "benchmarks/.cache/digits-teacher; with --denoiser mmdit-flow: benchmarks/.cache/digits-teacher-flow"
)


def load_diffusion_model(source: str | Path) -> DiffusionModel:
    """A teacher folder or an exported student folder.

    A teacher is a diffusers pipeline folder: ``unet/`` or ``transformer/`` plus
    ``scheduler/`` (DDPM-type or FlowMatchEuler). A class-conditional UNet2DModel needs
    nothing else; a text-conditional denoiser (UNet2DConditionModel, SD3Transformer2DModel)
    also needs ``text_encoder/`` (and ``tokenizer/``, else the encoder folder's tokenizer),
    which encodes the digit prompts once. An optional ``sampling.json`` holds the teacher's
    SamplingSpec.
    """
    d = _diffusers()
    folder = Path(source)
    if (folder / "conditioner").is_dir():
        pipe = safe_from_pretrained(StepReducedPipeline, folder)
        return pipe.to_diffusion_model().eval()
    sub = next((folder / n for n in ("unet", "transformer") if (folder / n).is_dir()), None)
    if sub is None or not (folder / "scheduler").is_dir():
        what = "does not exist" if not folder.exists() else "is not a diffusers pipeline folder"
        raise DataError(
            f"{folder}: {what} (a folder with unet/ or transformer/ and scheduler/, as diffusers' "
            "save_pretrained writes); the digits teacher the shipped digits recipes use is made by "
            f"`python benchmarks/train_digits_teacher.py` (writes {DIGITS_TEACHER_HINT})"
        )
    kind = _config_json(sub / "config.json").get("_class_name")
    if kind not in DENOISERS:
        raise DataError(f"{sub}: denoiser {kind!r} is not supported (supported: {list(DENOISERS)})")
    denoiser = safe_from_pretrained(getattr(d, kind), sub).eval()
    train_config = _training_config(d, folder / "scheduler")
    spec = _read_sampling(folder)
    if kind == "UNet2DModel":
        return from_class_unet(denoiser, train_config, spec).eval()
    if kind == "DiTTransformer2DModel":
        return from_dit(denoiser, train_config, spec).eval()
    if not (folder / "text_encoder").is_dir():
        raise DataError(
            f"{folder}: a text-conditional {kind} needs a text_encoder/ folder to encode its prompts"
        )
    tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    embeds, pooled = encode_prompts(folder / "text_encoder", DIGIT_PROMPTS, tokenizer=tokenizer)
    use_pooled = pooled if kind == "SD3Transformer2DModel" else None
    return from_text_denoiser(denoiser, train_config, spec, DIGIT_PROMPTS, embeds, use_pooled).eval()
