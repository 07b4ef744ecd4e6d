"""Shared test helpers (recording cores, tiny fixtures)."""

from __future__ import annotations

import torch

from attnpack.attn_processors import AttentionCall


class RecordingCore:
    """Dense attention that records each call's layer, layout and run state."""

    def __init__(self):
        self.calls: list[AttentionCall] = []
        self.shapes: list[tuple] = []

    def __call__(self, q, k, v, call: AttentionCall):
        self.calls.append(call)
        self.shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return call.dense(q, k, v)

    def __repr__(self):
        return "RecordingCore()"


class ScaledCore:
    """A deliberately wrong core (output scaled): proves a parity test can fail."""

    def __init__(self, factor: float = 1.01):
        self.factor = factor

    def __call__(self, q, k, v, call):
        return call.dense(q, k, v) * self.factor


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
