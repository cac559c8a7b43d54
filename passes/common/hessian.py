"""Layer-input Hessians for one-shot second-order compression (SparseGPT, GPTQ).

For a Linear layer ``y = x Wᵀ`` and the layer-wise objective ``||X Wᵀ - X Ŵᵀ||²`` the
Hessian with respect to each row of ``W`` is ``H = 2 XᵀX``. We keep the running mean
``H = (2/n) Σ x xᵀ`` over all calibration tokens (Frantar & Alistarh, "SparseGPT",
2023; Frantar et al., "GPTQ", 2022), so its scale does not grow with the sample count
and the relative dampening ``percdamp · mean(diag H)`` means the same thing for any
calibration set.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates ``H = (2/n) Σ x xᵀ`` over batches of a layer's inputs (fp32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_samples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape (..., in_features); every row is one sample (token)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)  # (n, in)
        n = x.shape[0]
        if n == 0:
            return
        total = self.num_samples + n
        self.hessian.mul_(self.num_samples / total)
        x = x * (2.0 / total) ** 0.5
        self.hessian.addmm_(x.t(), x)  # (in, in)
        self.num_samples = total


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``(2/n) XᵀX`` for inputs of shape (..., in_features), in one call."""
    acc = HessianAccumulator(x.shape[-1], x.device)
    acc.add_batch(x)
    return acc.hessian


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = percdamp · mean(diag H)``.

    Inputs that were never active (zero diagonal) get a unit diagonal so ``H`` stays
    positive definite; the returned ``dead`` mask tells callers to zero those weight
    columns (they never contribute to the output). If the Cholesky factorisation
    fails (a nearly singular ``H``), the dampening is raised tenfold, up to 4 times.
    """
    h = hessian.detach().clone().to(torch.float32)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diag_mean = torch.mean(torch.diag(h))
    damp = percdamp * diag_mean
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(5):
        try:
            chol = torch.linalg.cholesky(h + damp * eye)
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True), dead
        except torch.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else 1e-6 * diag_mean
    raise ValueError("the Hessian is not positive definite even with 1000x dampening; check the inputs")
