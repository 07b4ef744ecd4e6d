"""Input checks shared by the attention entry points (errors name the argument and its value)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


__all__ = ["check_qkv", "per_axis"]


def per_axis(name: str, value, ndim: int, *, kind: type = int, where: str = "") -> tuple:
    """The one per-axis normaliser of the kernels and the processors: ``value`` (one ``kind`` for every axis, or a
    sequence of ``ndim`` of them) as a tuple of ``ndim``; else a ``ValueError`` naming the argument, the value and
    ``where`` (e.g. ``" of grid_shape=(8, 8)"``). Bools are never ints here (``True`` is not a window of 1)."""
    if kind is bool:
        ok = lambda v: isinstance(v, bool)  # noqa: E731
        expected = "a bool or a tuple of bools"
    else:
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        expected = "an int or a tuple of ints"
    if ok(value):
        return (value,) * ndim
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == ndim and all(map(ok, value)):
        return tuple(value)
    where = where or f" ({ndim} here)"
    raise ValueError(f"`{name}` must be {expected}, one per axis{where}, got {name}={value!r}.")


def check_qkv(query, key, value, *, n_hint: str = "N") -> None:
    """``query`` ``[B, H, Nq, D]``, ``key`` ``[B, H, Nk, D]``, ``value`` ``[B, H, Nk, Dv]`` on one device and dtype."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"`{name}` must be a [B, H, {n_hint}, D] tensor, got {got}.")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on the same device, got {query.device}, {key.device}, {value.device}."
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}.")
    b, h = query.shape[:2]
    if key.shape[:2] != (b, h) or value.shape[:2] != (b, h) or key.shape[2] != value.shape[2]:
        raise ValueError(
            f"key and value must be [B={b}, H={h}, Nk, D] with the same Nk, got key {tuple(key.shape)}, value "
            f"{tuple(value.shape)}."
        )
    if key.shape[3] != query.shape[3]:
        raise ValueError(f"query and key head dims must match, got {query.shape[3]} and {key.shape[3]}.")
