"""Oracles for the CLEAR tests: the mask and the pooling transcribed from the paper's rule, pair by pair."""

from __future__ import annotations

import math

import torch


def oracle_mask(grid, text_len, radius, down_factor=1) -> torch.Tensor:
    """The rule of the paper / official code, pair by pair: text queries see text + image keys (not pooled ones);
    image queries see text keys, pooled keys and image keys at Euclidean distance < r."""
    h, w = grid
    n_img = h * w
    pooled = (h // down_factor) * (w // down_factor) if down_factor > 1 else 0
    nq, nk = text_len + n_img, text_len + n_img + pooled
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    for q in range(nq):
        for k in range(nk):
            if q < text_len:
                mask[q, k] = k < text_len + n_img
            elif k < text_len or k >= text_len + n_img:
                mask[q, k] = True
            else:
                mask[q, k] = math.dist(divmod(q - text_len, w), divmod(k - text_len, w)) < radius
    return mask


def oracle_pool(x, grid, d, weight):
    """Pooled tokens by explicit loops: cell (cy, cx) = sum_ij weight[i, j] * x[(cy*d + i) * w + cx*d + j]."""
    h, w = grid
    out = []
    for cy in range(h // d):
        for cx in range(w // d):
            acc = 0
            for i in range(d):
                for j in range(d):
                    acc = acc + weight[i, j] * x[:, :, (cy * d + i) * w + cx * d + j]
            out.append(acc)
    return torch.stack(out, dim=2)
