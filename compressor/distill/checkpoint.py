"""Resumable distillation: the checkpoint ``compressor.distill.loop.distill_`` writes and reads.

A checkpoint holds everything the next step depends on: the student's state_dict
(masks and quantizer scales included), the optimizer state, the number of steps
done (which is also the position in the data: step ``s`` trains on batch
``s % len(batches)``), the RNG states (torch, CUDA, Python ``random``, NumPy) and the
loss history. Non-tensor state is stored as plain Python values so the file loads
with ``torch.load(..., weights_only=True)``: a pickle that tries to run code is
refused, never executed.

The file is named after the run it belongs to (``distill-<key>.pt``, the key a hash of
the student's structure, its weights when distillation starts, and the training
data), so two distillations in one pipeline never share a file. Inside, the full
fingerprint (that key plus the distillation config) is checked on load: a
checkpoint written with another config (say, a changed ``lr``) is refused with a
message that names what changed. Writes are atomic (temp file in the same directory,
fsync, ``os.replace``): an interrupted write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.adapters.base import Batch
from compressor.config import to_dict
from compressor.errors import PassError

if TYPE_CHECKING:
    from compressor.distill.config import RecoverConfig

log = logging.getLogger(__name__)

FORMAT = 1


class CheckpointError(PassError):
    """A distillation checkpoint that cannot be used (corrupt, or from another run)."""


def _hash_tensor(h: Any, name: str, t: torch.Tensor, values: bool) -> None:
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    if values:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def fingerprint(cfg: RecoverConfig, student: nn.Module, batches: Sequence[Batch]) -> dict[str, str]:
    """Hashes of what makes a distillation run this run: its config (``checkpoint_every`` and
    ``teacher_cache_mb`` aside: how often to save and what to cache do not change the
    training), the student's structure, its starting weights, and the data."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in ("checkpoint_every", "teacher_cache_mb")}
    structure, start, data = hashlib.sha256(), hashlib.blake2b(), hashlib.blake2b()
    for name, module in student.named_modules():
        structure.update(f"{name}:{type(module).__qualname__};".encode())
    for name, p in student.named_parameters():
        structure.update(f"{name}:{p.requires_grad};".encode())
    for name, t in student.state_dict().items():
        if isinstance(t, torch.Tensor):
            _hash_tensor(structure, name, t, values=False)
            _hash_tensor(start, name, t, values=True)
    for i, batch in enumerate(batches):
        for k in sorted(batch):
            _hash_tensor(data, f"{i}.{k}", batch[k], values=True)
    return {
        "config": json.dumps(config, sort_keys=True),
        "model": structure.hexdigest(),
        "start": start.hexdigest(),
        "data": data.hexdigest(),
    }


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


@dataclass
class DistillCheckpoint:
    """The checkpoint file of one distillation run and the fingerprint it must carry."""

    path: Path
    fingerprint: dict[str, str]
    steps: int
    num_batches: int

    @classmethod
    def for_run(
        cls, work_dir: Path, cfg: RecoverConfig, student: nn.Module, batches: Sequence[Batch]
    ) -> DistillCheckpoint:
        fp = fingerprint(cfg, student, batches)
        key = hashlib.sha256(f"{fp['model']}{fp['start']}{fp['data']}".encode()).hexdigest()[:16]
        return cls(work_dir / f"distill-{key}.pt", fp, cfg.steps, len(batches))

    def load(self) -> dict[str, Any] | None:
        """The checkpoint's state, None when there is none; CheckpointError when it is
        unreadable or was written by a different run."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip, a pickle that is not plain data, ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{self.path}: not a readable distillation checkpoint ({type(e).__name__}: {reason}); "
                "delete it to start this distillation over"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(
                f"{self.path}: not a distillation checkpoint of format {FORMAT}; delete it to start over"
            )
        theirs = state.get("fingerprint", {})
        changed = [k for k in self.fingerprint if theirs.get(k) != self.fingerprint[k]]
        if changed:
            raise CheckpointError(
                f"{self.path}: written by a different run ({self._describe(changed, theirs)}); "
                "delete it, or use another work dir, to start this distillation over"
            )
        step = state.get("step")
        if not isinstance(step, int) or not 0 < step <= self.steps or len(state.get("losses", ())) != step:
            raise CheckpointError(f"{self.path}: inconsistent step count {step!r}; delete it to start over")
        return state

    def _describe(self, changed: list[str], theirs: dict[str, str]) -> str:
        parts = []
        for k in changed:
            if k == "config" and "config" in theirs:
                ours, old = json.loads(self.fingerprint["config"]), json.loads(theirs["config"])
                diff = [f"{n}: {old.get(n)!r} -> {ours.get(n)!r}" for n in ours if old.get(n) != ours.get(n)]
                parts.append("distillation config changed: " + ", ".join(diff))
            else:
                parts.append(
                    {"model": "model structure", "start": "starting weights", "data": "training data"}.get(
                        k, k
                    )
                    + " differ"
                )
        return "; ".join(parts)

    def restore_(
        self, state: dict[str, Any], student: nn.Module, opt: torch.optim.Optimizer
    ) -> tuple[int, list[float]]:
        """Put the student, the optimizer and the RNGs where the checkpoint left them."""
        try:
            student.load_state_dict(state["student"], strict=True)
            opt.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{self.path}: does not fit this student ({e}); delete it to start over"
            ) from None
        return int(state["step"]), [float(x) for x in state["losses"]]

    def shards_of(self, state: dict[str, Any]) -> Path:
        """The sharded checkpoint folder an FSDP run's ``state`` names (CheckpointError when it
        names none, or anything but its own step's folder beside this file)."""
        name = state.get("shards")
        folder = self.path.with_suffix(".dcp") / f"step-{state.get('step')}"
        if name != folder.name or not (folder / ".metadata").is_file():
            raise CheckpointError(
                f"{self.path}: names sharded state {name!r} that is not its step's complete folder; "
                "delete it to start over"
            )
        return folder

    def save(
        self, student: nn.Module | None, opt: torch.optim.Optimizer | None, step: int, losses: list[float],
        shards: str | None = None,
    ) -> None:  # fmt: skip
        """Write atomically: temp file beside the checkpoint, fsync, rename over it. An FSDP run
        passes no student and optimizer but the ``shards`` folder their state is in."""
        state = {
            "format": FORMAT,
            "fingerprint": dict(self.fingerprint),
            "step": step,
            "data_position": step % self.num_batches,
            "losses": list(losses),
            "student": {} if student is None else student.state_dict(),
            "optimizer": {} if opt is None else opt.state_dict(),
            "rng": _rng_state(),
        }
        if shards is not None:
            state["shards"] = shards
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
        log.debug("distill: checkpoint at step %d written to %s", step, self.path)
