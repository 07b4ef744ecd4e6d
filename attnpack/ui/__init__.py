"""The Gradio web UI (``attnpack ui``): :func:`build_demo` builds the app; nothing loads a model (or Gradio) at
import time. Needs the ``ui`` extra: ``pip install attnpack[ui]``."""

from __future__ import annotations

from typing import TYPE_CHECKING


__all__ = ["build_demo"]


def __getattr__(name: str):
    if name == "build_demo":
        from .app import build_demo

        return build_demo
    raise AttributeError(f"module 'attnpack.ui' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .app import build_demo
