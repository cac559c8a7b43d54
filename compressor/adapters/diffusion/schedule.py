"""Noise schedules and samplers for the two training objectives the diffusion adapter covers.

Both objectives noise a clean image the same way, ``x_t = a_t x0 + s_t eps``:

- **epsilon** (DDPM-trained, ``DDPMScheduler`` configs): ``a_t = sqrt(alphas_cumprod[t])``,
  ``s_t = sqrt(1 - alphas_cumprod[t])``; the denoiser predicts eps and is fed the integer t.
- **flow** (rectified flow / flow matching, ``FlowMatchEulerDiscreteScheduler`` configs, as in
  SD3 and Flux): ``s_t = sigma_t``, ``a_t = 1 - sigma_t``; the denoiser predicts the velocity
  ``v = eps - x0`` and is fed ``sigma_t * num_train_timesteps``.

The step-reduction passes work on integer training timesteps ``t`` in ``[0, N)`` (``t = -1``
is the clean end) and never on a parameterisation directly: ``NoiseSchedule.x0_eps`` turns
a model output into ``(x0, eps)``, and one deterministic step ``x_t -> a' x0 + s' eps`` is
DDIM for epsilon models and exactly the Euler step of a flow model. So guidance,
progressive and consistency distillation run unchanged on both.

``make_scheduler`` builds the diffusers scheduler a model samples with, on the same
timestep grid the passes train on: DDIM / DPM-Solver++ / UniPC / LCM for epsilon models;
FlowMatchEuler (the first-order sampler, named ``ddim`` in a spec), FlowMatchLCM and the
flow variants of DPM-Solver++ / UniPC for flow models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.errors import DataError

SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)
FLOW_KEYS = ("num_train_timesteps", "shift")
# FlowMatchEulerDiscreteScheduler options that change the sigma grid in ways the passes do not model
_FLOW_REFUSED = (
    "use_dynamic_shifting",
    "invert_sigmas",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("diffusion models need diffusers: pip install 'compressor[diffusion]'") from e
    return diffusers


def training_schedule(config: dict[str, Any]) -> dict[str, Any]:
    """The teacher's training noise schedule from a scheduler config, tagged with its objective.

    A flow-matching config (``FlowMatch*`` class, or a ``shift`` key) gives
    ``{"objective": "flow", num_train_timesteps, shift}``; anything else is read as a DDPM
    schedule ``{"objective": "epsilon", ...the beta keys}``. Raises ``DataError`` for what the
    passes cannot model (v-prediction, dynamic shifting, Karras sigmas ...).
    """
    if config.get("objective") in ("flow", "epsilon"):
        return dict(config)
    name = str(config.get("_class_name", ""))
    if name.startswith("FlowMatch") or "shift" in config:
        bad = [k for k in _FLOW_REFUSED if config.get(k)]
        if bad:
            raise DataError(f"scheduler: flow-matching option(s) {bad} are not supported (static shift only)")
        return {"objective": "flow", **{k: config[k] for k in FLOW_KEYS if k in config}}
    pred = config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise DataError(
            f"scheduler: prediction_type {pred!r} is not supported; the diffusion adapter covers "
            "epsilon-prediction (DDPM) and flow-matching (velocity) denoisers"
        )
    return {"objective": "epsilon", **{k: config[k] for k in SCHEDULE_KEYS if k in config}}


class NoiseSchedule(nn.Module):
    """``x_t = a_t x0 + s_t eps`` at integer timesteps, and what the denoiser is fed at each."""

    a: torch.Tensor
    s: torch.Tensor
    net_t: torch.Tensor

    def __init__(self, train_config: dict[str, Any]) -> None:
        super().__init__()
        cfg = training_schedule(train_config)
        self.objective: str = cfg["objective"]
        n = int(cfg.get("num_train_timesteps", 1000))
        if self.objective == "flow":
            shift = float(cfg.get("shift", 1.0))
            u = torch.arange(1, n + 1, dtype=torch.float64) / n
            sigma = shift * u / (1 + (shift - 1) * u)  # FlowMatchEulerDiscreteScheduler's training sigmas
            a, s, net_t = 1 - sigma, sigma, (sigma * n).float()
        else:
            ddpm = {k: v for k, v in cfg.items() if k in SCHEDULE_KEYS}
            ac = _diffusers().DDPMScheduler.from_config(ddpm).alphas_cumprod.double()
            a, s, net_t = ac.sqrt(), (1 - ac).sqrt(), torch.arange(n)
        self.register_buffer("a", a.float(), persistent=False)
        self.register_buffer("s", s.float(), persistent=False)
        self.register_buffer("net_t", net_t, persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.a.shape[0])

    @property
    def clips_x0(self) -> bool:
        """DDIM clips its x0 prediction to the data range; flow-matching Euler does not."""
        return self.objective == "epsilon"

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """Integer timesteps (B,) -> what the denoiser is fed (the int itself, or sigma * N)."""
        return self.net_t[t.clamp(min=0)]

    def coef(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) as (B,1,1,1) each; t = -1 is the clean end (1, 0)."""
        clean = (t < 0).view(-1, 1, 1, 1)
        i = t.clamp(min=0)
        a = torch.where(clean, torch.ones_like(self.a[i]).view(-1, 1, 1, 1), self.a[i].view(-1, 1, 1, 1))
        s = torch.where(clean, torch.zeros_like(self.s[i]).view(-1, 1, 1, 1), self.s[i].view(-1, 1, 1, 1))
        return a, s

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s = self.coef(t)
        return a * x0 + s * noise

    def affine(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(p0, q0, pe, qe) with x0 = p0 x + q0 out and eps = pe x + qe out at t (>= 0)."""
        a, s = self.coef(t)
        if self.objective == "flow":  # x0 = x - sigma v, eps = x + (1 - sigma) v
            return torch.ones_like(a), -s, torch.ones_like(a), a
        return 1 / a, -s / a, torch.zeros_like(a), torch.ones_like(a)

    def x0_eps(
        self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p0, q0, pe, qe = self.affine(t)
        return p0 * x + q0 * out, pe * x + qe * out

    def step(
        self, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, clip: bool = True
    ) -> torch.Tensor:
        """One deterministic step t -> t_prev: DDIM (eta 0, x0 clipped like diffusers' DDIMScheduler
        when ``clip``) for epsilon models, the Euler step for flow models."""
        x0, eps = self.x0_eps(out, x, t)
        if clip and self.clips_x0:
            x0 = x0.clamp(-1, 1)
        a, s = self.coef(t_prev)
        return a * x0 + s * eps

    def output_for_target(
        self, x: torch.Tensor, x_target: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor
    ) -> torch.Tensor:
        """The model output whose single unclipped step t -> t_next lands on ``x_target``
        (Salimans & Ho eq. 8, solved for the output; for flow models the Euler velocity)."""
        p0, q0, pe, qe = self.affine(t)
        a, s = self.coef(t_next)
        return (x_target - (a * p0 + s * pe) * x) / (a * q0 + s * qe)

    def boundary_scalings(
        self, t: torch.Tensor, timestep_scaling: float = 10.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """c_skip, c_out of the consistency function f = c_skip x + c_out x0.

        Epsilon models use diffusers' LCMScheduler form (sigma_data 0.5, t = -1 as 0); a flow
        model's x0 = x - sigma v already equals x at sigma = 0, and FlowMatchLCMScheduler
        samples with x0 itself, so (0, 1).
        """
        st = t.clamp(min=0).float().view(-1, 1, 1, 1)
        if self.objective == "flow":
            return torch.zeros_like(st), torch.ones_like(st)
        st = st * timestep_scaling
        return 0.25 / (st**2 + 0.25), st / (st**2 + 0.25).sqrt()


def ddim_grid(num_train_timesteps: int, steps: int) -> list[int]:
    """The trailing DDIM timesteps diffusers uses for ``steps`` steps, highest first."""
    ratio = num_train_timesteps / steps
    return [int(v) for v in (torch.arange(num_train_timesteps, 0, -ratio).round() - 1).tolist()]


# clip the predicted clean image to the data range at every step, as DDIM's clip_sample does:
# dynamic thresholding with sample_max_value 1 is exactly that clip (the quantile is floored at 1)
_X0_CLIP = {"thresholding": True, "sample_max_value": 1.0}


def make_scheduler(train_config: dict[str, Any], spec: Any) -> Any:
    """A diffusers scheduler for ``spec`` (a SamplingSpec) on the teacher's schedule, set to ``spec.steps``."""
    cfg = training_schedule(train_config)
    if cfg["objective"] == "flow":
        return _flow_scheduler(cfg, spec)
    d = _diffusers()
    # only the noise schedule carries over: sampler options (clipping etc.) are set here, so a
    # student reloaded from its own scheduler config samples identically
    base = {k: v for k, v in cfg.items() if k in SCHEDULE_KEYS}
    if spec.sampler == "ddim":
        sched = d.DDIMScheduler.from_config(base, timestep_spacing="trailing", clip_sample=True)
    elif spec.sampler == "dpmsolver++":
        sched = d.DPMSolverMultistepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", **_X0_CLIP
        )
    elif spec.sampler == "unipc":
        sched = d.UniPCMultistepScheduler.from_config(
            base, solver_order=2, timestep_spacing="trailing", **_X0_CLIP
        )
    elif spec.sampler == "lcm":
        sched = d.LCMScheduler.from_config(
            base, original_inference_steps=spec.original_inference_steps, clip_sample=True
        )
    else:
        raise ValueError(f"unknown sampler {spec.sampler!r}")
    sched.set_timesteps(spec.steps)
    return sched


def _flow_scheduler(cfg: dict[str, Any], spec: Any) -> Any:
    """Flow-matching samplers; the first-order and LCM ones are given the passes' exact grid.

    FlowMatch schedulers shift the sigmas they are handed, so they get the unshifted
    ``u = (t + 1) / N`` of each integer timestep t and land on ``NoiseSchedule``'s sigma_t.
    """
    d = _diffusers()
    n = int(cfg.get("num_train_timesteps", 1000))
    shift = float(cfg.get("shift", 1.0))
    base = {"num_train_timesteps": n, "shift": shift}
    if spec.sampler in ("ddim", "lcm"):
        if spec.sampler == "ddim":
            grid = ddim_grid(n, spec.steps)
            sched = d.FlowMatchEulerDiscreteScheduler.from_config(base)
        else:  # the timesteps LCMScheduler picks from the consistency training grid
            lcm = d.LCMScheduler(
                num_train_timesteps=n, original_inference_steps=spec.original_inference_steps
            )
            lcm.set_timesteps(spec.steps)
            grid = [int(t) for t in lcm.timesteps]
            sched = d.FlowMatchLCMScheduler.from_config(base)
        sched.set_timesteps(sigmas=[(t + 1) / n for t in grid])
        return sched
    flow = {"num_train_timesteps": n, "use_flow_sigmas": True, "flow_shift": shift,
            "prediction_type": "flow_prediction", "solver_order": 2}  # fmt: skip
    if spec.sampler == "dpmsolver++":
        sched = d.DPMSolverMultistepScheduler.from_config(flow, algorithm_type="dpmsolver++")
    elif spec.sampler == "unipc":
        sched = d.UniPCMultistepScheduler.from_config(flow)
    else:
        raise ValueError(f"unknown sampler {spec.sampler!r}")
    sched.set_timesteps(spec.steps)
    return sched
