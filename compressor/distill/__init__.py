"""The distillation engine: recovery training of a compressed student against its teacher.

Modules: ``config`` (RecoverConfig, DistillLossConfig), ``losses`` (the objective),
``teacher`` (the teacher's outputs and their cache), ``distributed`` (torchrun / DDP),
``checkpoint`` (resumable runs) and ``loop`` (``distill_``). The public API is re-exported
here; code inside the repository imports from the defining module.
"""

from __future__ import annotations

from compressor.distill.config import DistillLossConfig, RecoverConfig
from compressor.distill.loop import distill_

__all__ = ["DistillLossConfig", "RecoverConfig", "distill_"]
