"""Oracles for the CLEAR tests: the mask and the pooling transcribed from the paper's rule, pair by pair."""

from __future__ import annotations

import math

import torch

from attnpack.kernels.block_sparse.naive import masked_attention


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


class OracleCore:
    """Dense masked attention with the mask transcribed from the paper (and loop-pooled keys / values)."""

    def __init__(self, radius, down_factor=1, weights=None, proportional=False):
        self.radius, self.d, self.weights, self.proportional = radius, down_factor, weights or {}, proportional

    def __call__(self, q, k, v, call):
        grid, t = call.layout.grid, call.layout.num_text
        if self.d > 1:
            w = self.weights[call.layer.name].reshape(self.d, self.d).to(q.dtype)
            k = torch.cat([k, oracle_pool(k[:, :, t:], grid, self.d, w)], dim=2)
            v = torch.cat([v, oracle_pool(v[:, :, t:], grid, self.d, w)], dim=2)
        scale = None
        if self.proportional:  # official: sqrt(log_{64^2 + 512}(N) / head_dim), N = 10 (T + HW) with pooled tokens
            n = q.shape[2] * (10 if self.d > 1 else 1)
            scale = math.sqrt(math.log(n) / math.log(64**2 + 512) / q.shape[-1])
        return masked_attention(q, k, v, oracle_mask(grid, t, self.radius, self.d), scale=scale).to(q.dtype)
