"""Looking at the toy models' attention: recorded attention maps, a locality measure and a local-window probe.

These are analysis tools (docs figures, ``benchmarks/toy_fidelity.py``, tests), not techniques: the recorder returns
dense attention unchanged, and the probe is plain masked dense attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attn_processors.processor import AttentionCall, ObserverCore


__all__ = ["AttentionRecorder", "LocalWindowProbe", "local_window_mask", "locality"]


def _image_positions(grid: Sequence[int], device=None) -> torch.Tensor:
    """``[N, 2]`` (row, col) of the tokens of a row-major ``(H, W)`` grid."""
    h, w = grid[-2], grid[-1]
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([rows, cols], dim=1)


def local_window_mask(call: AttentionCall, window: int, device=None) -> torch.Tensor | None:
    """Boolean ``[N_q, N_k]`` mask: image queries see image keys within a ``window x window`` square (Chebyshev
    radius ``window // 2``) plus all text keys; text queries see everything. ``None`` for cross-attention or when the
    grid is unknown (then the layer stays dense)."""
    lay = call.layout
    if lay.is_cross or lay.grid is None or lay.image is None or lay.key_image is None or len(lay.grid) != 2:
        return None
    pos = _image_positions(lay.grid, device)
    near = (pos[:, None, :] - pos[None, :, :]).abs().amax(-1) <= window // 2
    mask = torch.ones(lay.num_queries, lay.num_keys, dtype=torch.bool, device=device)
    mask[lay.image, lay.key_image] = near
    return mask


class LocalWindowProbe:
    """Dense attention restricted to a local window around each image query (see :func:`local_window_mask`)."""

    def __init__(self, window: int):
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"`window` must be an odd positive integer, got {window!r}.")
        self.window = window

    def __call__(self, q, k, v, call: AttentionCall):
        mask = local_window_mask(call, self.window, q.device)
        return call.dense(q, k, v) if mask is None else call.dense(q, k, v, mask=mask)

    def __repr__(self) -> str:
        return f"LocalWindowProbe(window={self.window})"


class AttentionRecorder(ObserverCore):
    """Records image-to-image attention probabilities, averaged over heads and batch rows, and returns dense
    attention unchanged.

    ``maps[(layer name, step index)]`` is ``[N_img, N_img]`` (query row-major over the grid, keys likewise), with
    ``grids[layer name]`` the grid. ``steps``: which denoising steps to record (default all); ``rows``: which batch
    rows (default all; e.g. the conditional half under classifier-free guidance).
    """

    def __init__(self, steps: Sequence[int] | None = None, rows: slice | None = None):
        self.steps = None if steps is None else set(steps)
        self.rows = rows
        self.maps: dict[tuple[str, int], torch.Tensor] = {}
        self.grids: dict[str, tuple[int, ...]] = {}

    def observe(self, q, k, v, call: AttentionCall, out) -> None:
        lay, step = call.layout, call.run.step_index
        if (
            not lay.is_cross
            and lay.grid is not None
            and lay.image is not None
            and lay.key_image is not None
            and (self.steps is None or step in self.steps)
        ):
            rows = self.rows or slice(None)
            qi, ki = q[rows, :, lay.image].float(), k[rows, :, lay.key_image].float()
            kt = k[rows, :, lay.key_text].float() if lay.key_text is not None else ki[:, :, :0]
            scale = q.shape[-1] ** -0.5
            logits = torch.cat([qi @ ki.transpose(-1, -2), qi @ kt.transpose(-1, -2)], dim=-1) * scale
            probs = logits.softmax(-1)[..., : ki.shape[2]]  # image keys' share of the full softmax
            self.maps[(call.layer.name, step)] = probs.mean(dim=(0, 1)).cpu()
            self.grids[call.layer.name] = tuple(lay.grid)

    def __repr__(self) -> str:
        return "AttentionRecorder()"


def locality(probs: torch.Tensor, grid: Sequence[int], radius: int = 1) -> tuple[float, float]:
    """Mean share of each query's image attention within Chebyshev distance ``radius`` of itself, and the share a
    uniform attention would give (same neighbourhood sizes, clipped at the borders): ``(measured, uniform)``."""
    pos = _image_positions(grid)
    near = ((pos[:, None, :] - pos[None, :, :]).abs().amax(-1) <= radius).float()
    p = probs / probs.sum(-1, keepdim=True)
    measured = float((p * near).sum(-1).mean())
    uniform = float(near.sum(-1).mean() / near.shape[-1])
    return measured, uniform
