"""SparseGPT: one-shot pruning with second-order weight reconstruction.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (ICML 2023). For each Linear, with the Hessian ``H = 2XᵀX`` of its
calibration inputs, columns are visited left to right in blocks; inside a block the
mask is chosen by the OBS saliency ``w² / [H⁻¹]ᵢᵢ²`` and every pruned weight's error
is pushed onto the not-yet-visited columns through the Cholesky factor of ``H⁻¹``.
Supports unstructured ratios and n:m patterns (2:4 for sparse tensor cores): ``n``
of every ``m`` consecutive input weights of a row are zeroed.

``magnitude_prune`` is the data-free baseline with the same patterns.
"""

from __future__ import annotations

import torch

from compressor.passes.common.hessian import damped_inverse_cholesky


def _check_pattern(sparsity: float, prune_n: int, prune_m: int, in_features: int) -> None:
    if prune_n or prune_m:
        if not (0 < prune_n < prune_m):
            raise ValueError(f"n:m pattern {prune_n}:{prune_m} needs 0 < n < m")
        if in_features % prune_m:
            raise ValueError(f"in_features={in_features} is not a multiple of m={prune_m}")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")


def magnitude_prune(
    weight: torch.Tensor, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the smallest-magnitude weights: ``n`` of every ``m`` along the input dim when
    ``prune_n`` is set, else the ``sparsity`` fraction of each row. Returns (weight, kept mask)."""
    out_f, in_f = weight.shape
    _check_pattern(sparsity, prune_n, prune_m, in_f)
    w = weight.detach().to(torch.float32)
    if prune_n:
        groups = w.abs().reshape(out_f, in_f // prune_m, prune_m)  # (out, in/m, m)
        drop = torch.zeros_like(groups, dtype=torch.bool)
        drop.scatter_(2, torch.topk(groups, prune_n, dim=2, largest=False).indices, True)
        keep = ~drop.reshape(out_f, in_f)
    else:
        k = int(in_f * sparsity)
        keep = torch.ones_like(w, dtype=torch.bool)
        if k:
            keep.scatter_(1, torch.topk(w.abs(), k, dim=1, largest=False).indices, False)
    return (w * keep).to(weight.dtype), keep


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) given ``hessian`` (in, in) of its inputs.

    ``prune_n``/``prune_m`` > 0 selects an n:m pattern (zero ``n`` of every ``m``
    consecutive inputs); otherwise ``sparsity`` of each block is zeroed (unstructured).
    Returns the reconstructed weight (same dtype as ``weight``, exactly zero where
    pruned) and the boolean keep-mask (True = kept).
    """
    out_f, in_f = weight.shape
    _check_pattern(sparsity, prune_n, prune_m, in_f)
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features={in_f}")
    if prune_n and blocksize % prune_m:
        blocksize = max(blocksize // prune_m, 1) * prune_m  # n:m groups must not straddle blocks
    w_all = weight.detach().clone().to(torch.float32)
    hinv, dead = damped_inverse_cholesky(hessian.to(w_all.device), percdamp)
    w_all[:, dead] = 0.0
    keep = torch.ones_like(w_all, dtype=torch.bool)

    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        w1 = w_all[:, i1:i2].clone()  # (out, count)
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)  # (count,)
        if prune_n:
            drop1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            # OBS saliency over the whole block; exactly round(sparsity * numel) pruned
            score = w1**2 / d1[None, :] ** 2
            k = int(round(score.numel() * sparsity))
            drop1 = torch.zeros(score.numel(), dtype=torch.bool, device=w1.device)
            if k:
                drop1[torch.topk(score.flatten(), k, largest=False).indices] = True
            drop1 = drop1.reshape(w1.shape)
        for i in range(count):
            w = w1[:, i]
            d = hinv1[i, i]
            if prune_n and i % prune_m == 0:
                score = w1[:, i : i + prune_m] ** 2 / d1[i : i + prune_m][None, :] ** 2
                drop1.scatter_(1, i + torch.topk(score, prune_n, dim=1, largest=False).indices, True)
            q = w.clone()
            q[drop1[:, i]] = 0.0
            q1[:, i] = q
            err = (w - q) / d
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w_all[:, i1:i2] = q1
        keep[:, i1:i2] = ~drop1
        w_all[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    w_all = w_all * keep  # exact zeros, whatever rounding did
    return w_all.to(weight.dtype), keep
