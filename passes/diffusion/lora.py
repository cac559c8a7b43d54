"""LoRA plumbing for the step-reduction passes: train low-rank adapters, then merge them.

For denoisers too large to fine-tune, the distillation passes freeze the denoiser and
train rank-r adapters on its convolutions, projections and attention (Hu et al.,
"LoRA: Low-Rank Adaptation of Large Language Models", 2021) through peft, and fold them
back afterwards so the student is a plain denoiser again.
"""

from __future__ import annotations

from torch import nn

from compressor.errors import PassError

LORA_TARGETS = ("conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0")
"""The module-name suffixes LoRA adapters go on (UNet resnets, attention projections)."""


def attach_lora_(unet: nn.Module, rank: int) -> None:
    """Freeze the denoiser and train rank-``rank`` LoRA adapters on its convs, projections
    and attention (Hu et al., 2021), through peft; for denoisers too large to fine-tune."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise PassError("lora_rank > 0 needs peft: pip install peft") from e
    unet.requires_grad_(False)
    names = [n for n, _ in unet.named_modules()]
    targets = [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unet)


def merge_lora_(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back; returns the count."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from compressor.modules import set_module

    merged = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            set_module(model, name, m.get_base_layer())
            merged += 1
    return merged
