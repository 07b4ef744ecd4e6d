"""Explicit-matrix reference of head perturbation (the oracle for tests/test_head_*.py).

Written from the definitions (HeadHunter Eq. 7 and the diffusers PAG masks), materialising every attention map:
``A = softmax(Q K^T * scale + mask)``, the target map ``A'``, ``(1 - u) A + u A'``, times ``V``. Kept independent of
``attnpack.attn_processors.head_perturbation`` on purpose (logit means instead of mean keys, masks instead of extra
keys).
"""

from __future__ import annotations

import math

import torch


def _additive(mask, shape, dtype):
    if mask is None:
        return torch.zeros(shape, dtype=dtype)
    if mask.dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype).masked_fill(~mask.expand(shape), float("-inf"))
    return mask.to(dtype).expand(shape)


def reference_perturbed_attention(q, k, v, *, image=None, text=None, u=1.0, kind="identity", scope="full", mask=None):
    """``[b, h, N, d]`` SoftPAG attention output computed with explicit ``N x N`` maps (float64 inside)."""
    dtype = q.dtype
    q, k, v = (x.double() for x in (q, k, v))
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    bias = _additive(mask, (b, h, n, n), torch.float64)
    logits = q @ k.transpose(-1, -2) * scale + bias
    attn = logits.softmax(-1)
    joint = scope == "image" and text is not None and (text.stop - text.start) > 0
    if not joint:
        if kind == "identity":
            target = torch.eye(n, dtype=torch.float64).expand(b, h, n, n)
        elif kind == "uniform":
            target = bias.softmax(-1)  # uniform over the visible keys
        else:
            q_mean = q.mean(-2, keepdim=True).expand_as(q)
            target = (q_mean @ k.transpose(-1, -2) * scale + bias).softmax(-1)
    else:
        new_logits = logits.clone()
        ii = new_logits[:, :, image, image]
        if kind == "identity":  # diffusers PAG: -inf on the image-image block except its diagonal
            eye = torch.eye(ii.shape[-1], dtype=torch.bool)
            ii = ii.masked_fill(~eye, float("-inf"))
        elif kind == "uniform":  # image-image logits replaced by their row mean
            ii = ii.mean(-1, keepdim=True).expand_as(ii)
        else:  # image queries replaced by the mean image query
            q_mean = q[:, :, image].mean(-2, keepdim=True)
            new_logits[:, :, image] = (q_mean @ k.transpose(-1, -2) * scale) + bias[:, :, image]
            ii = new_logits[:, :, image, image]
        new_logits[:, :, image, image] = ii
        target = attn.clone()
        target[:, :, image] = new_logits[:, :, image].softmax(-1)
    mixed = (1 - u) * attn + u * target
    return (mixed @ v).to(dtype)
