"""Fidelity of an approximate output against a reference: cosine similarity, relative L2 and PSNR."""

from __future__ import annotations

import math

import torch


__all__ = ["fidelity"]


def fidelity(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """Compare ``output`` with ``reference`` (same shape), as in PARO's tables.

    Returns ``cosine`` (of the flattened tensors), ``rel_l2`` (``||out - ref|| / ||ref||``) and ``psnr`` in dB with
    the reference's range as peak: ``20 log10((max(ref) - min(ref)) / rmse)`` (``inf`` when identical).
    """
    if reference.shape != output.shape:
        raise ValueError(f"shapes differ: reference {tuple(reference.shape)}, output {tuple(output.shape)}.")
    ref = reference.detach().double().flatten()
    out = output.detach().double().flatten()
    diff = out - ref
    ref_norm = ref.norm().item()
    cosine = torch.nn.functional.cosine_similarity(ref, out, dim=0).item()
    rel_l2 = diff.norm().item() / ref_norm if ref_norm > 0 else math.inf
    rmse = diff.pow(2).mean().sqrt().item()
    peak = (ref.max() - ref.min()).item()
    psnr = math.inf if rmse == 0 else 20.0 * math.log10(max(peak, 1e-30) / rmse)
    return {"cosine": cosine, "rel_l2": rel_l2, "psnr": psnr}
