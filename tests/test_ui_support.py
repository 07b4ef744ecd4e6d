"""Shared pieces of the UI tests (this module holds no tests): optional packages, launching a demo, the test
techniques, and reference images computed without the UI (stock diffusers pipelines called directly)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnpack.attn_processors import apply_processors
from attnpack.techniques import Option, Technique, available_techniques
from attnpack.toy.loader import TOY_MODELS, load_toy_pipeline
from attnpack.toy.tiny import TINY_MODELS, build_tiny_pipeline


IN_CI = os.environ.get("CI", "").lower() == "true"
STEPS = 2
# Chromium flags checked on this project's machines: no sandbox (root in CI), no GPU, no background network traffic
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def need(module: str, install: str):
    """Import ``module``; without it, fail in CI (CI installs it) and skip elsewhere, saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"`{module}` is not installed ({install})"
        if IN_CI:
            pytest.fail(f"{message}; CI must run this test.", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def chromium_path() -> str:
    """Debian's Chromium (``apt-get install chromium``), or ``$ATTNPACK_CHROMIUM``; fail in CI, skip elsewhere."""
    path = os.environ.get("ATTNPACK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        message = "Chromium is not installed (Debian: `apt-get install -y chromium`; or set ATTNPACK_CHROMIUM)"
        if IN_CI:
            pytest.fail(f"{message}; CI must run the browser test.", pytrace=False)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(demo):
    """Launch ``demo`` on a free local port, serving what `attnpack ui` serves; yield its URL; close it afterwards."""
    from attnpack.ui._layout import UI_CSS

    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        allowed_paths=demo.attnpack_runtime.served_paths,
        css=UI_CSS,
    )
    try:
        yield demo.local_url
    finally:
        demo.close()


def fetch_file(url: str, path) -> tuple[int, bytes]:
    """``GET /gradio_api/file=<path>`` on the local server at ``url``: ``(HTTP status, body)``."""
    import urllib.error
    import urllib.parse
    import urllib.request

    assert url.startswith("http://127.0.0.1:"), url  # the test's own server only
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/file={urllib.parse.quote(str(path))}") as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def raw_call(client, api_name: str, timeout: float = 300, **kwargs) -> tuple[str, object]:
    """Call a named endpoint with plain HTTP on the local server, as any script could: the JSON is written by Python's
    `json`, which (unlike gradio_client) sends NaN and Infinity. Parameters not given take their API defaults.
    Returns ``("complete", outputs)`` or ``("error", message)`` (``None`` when Gradio gave no message)."""
    import json
    import urllib.request

    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert set(kwargs) <= set(names), sorted(set(kwargs) - set(names))
    data = [kwargs.get(p["parameter_name"], p.get("parameter_default")) for p in params]
    url = client.src.rstrip("/") + "/gradio_api/call" + api_name
    assert url.startswith("http://127.0.0.1:"), url  # the test's own server only
    request = urllib.request.Request(
        url, data=json.dumps({"data": data}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}/{event_id}", timeout=timeout) as response:
        lines = response.read().decode().splitlines()
    event = [line[len("event: ") :] for line in lines if line.startswith("event: ")][-1]
    payload = json.loads([line[len("data: ") :] for line in lines if line.startswith("data: ")][-1])
    return (event, payload) if event == "complete" else (event, payload and payload.get("error"))


# ------------------------------------------------------------------------------------------------ test techniques
class TemperatureCore:
    """Attention with its logits multiplied by ``factor`` (1: dense attention)."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, q, k, v, call):
        return call.dense(q, k, v, scale=self.factor / math.sqrt(q.shape[-1]))

    def __repr__(self):
        return f"TemperatureCore({self.factor})"


def apply_temperature(pipe, factor: float = 1.0, factor_file: str | None = None):
    if factor_file is not None:
        from safetensors.torch import load_file

        factor = float(load_file(factor_file)["factor"])
    return apply_processors(pipe, TemperatureCore(factor), description=f"temperature {factor}")


TEMPERATURE = Technique(
    name="temperature",
    summary="sharpen (factor > 1) or soften every attention map",
    apply=apply_temperature,
    options=(
        Option("factor", "float", 1.0, "attention logit multiplier", minimum=0.1, maximum=10.0),
        Option("factor_file", "str", None, "a .safetensors file with a scalar tensor `factor`"),
    ),
)


def ui_techniques() -> dict[str, Technique]:
    """What the UI tests offer: every registered technique, plus the test-only ``temperature`` (registered nowhere,
    so it also shows that the UI is built from whatever technique table it is given)."""
    return {**available_techniques(), "temperature": TEMPERATURE}


# ------------------------------------------------------------------------------------------------ instrumentation
class Watch:
    """Wraps each loaded pipeline's denoiser: counts loads, the most denoiser calls in flight at once, and can
    simulate running out of GPU memory (inputs above ``oom_tokens`` tokens) or block until released."""

    def __init__(self, load, oom_tokens: int | None = None, block: bool = False):
        self.load = load
        self.oom_tokens = oom_tokens
        self.loads: list[str] = []
        self.active = 0
        self.max_active = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.block = block
        self._lock = threading.Lock()

    def __call__(self, name: str):
        self.loads.append(name)
        pipe = self.load(name)
        denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
        inner = denoiser.forward

        @functools.wraps(inner)  # keeps the signature, which the run-context hook binds the arguments with
        def forward(hidden_states, *args, **kwargs):
            with self._lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                self.entered.set()
                if self.block:
                    assert self.release.wait(timeout=120), "test never released the pipeline"
                if self.oom_tokens is not None and hidden_states.shape[1] > self.oom_tokens:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
                return inner(hidden_states, *args, **kwargs)
            finally:
                with self._lock:
                    self.active -= 1

        denoiser.forward = forward
        return pipe


# ------------------------------------------------------------------------------------------------ references
_REFERENCE_PIPES: dict[str, object] = {}
_REFERENCES: dict[tuple, np.ndarray] = {}


def reference_image(model: str, prompt: str, seed: int, *, technique: str | None = None, size=None, **options):
    """The image stock diffusers makes for this request: the pipeline called directly (CPU generator with ``seed``,
    the tiny/toy model's call defaults, ``size`` x ``size`` if given), with ``technique`` installed through its Python
    API with ``options`` when given. ``uint8 [H, W, 3]``."""
    key = (model, prompt, seed, technique, size, tuple(sorted(options.items())))
    if key not in _REFERENCES:
        if model not in _REFERENCE_PIPES:
            _REFERENCE_PIPES[model] = load_toy_pipeline(model) if model in TOY_MODELS else build_tiny_pipeline(model)
        pipe = _REFERENCE_PIPES[model]
        kwargs = dict(TOY_MODELS[model][1] if model in TOY_MODELS else TINY_MODELS[model][2])
        kwargs.pop("num_inference_steps", None)
        if size is not None:
            kwargs.update(height=size, width=size)
        handle = ui_techniques()[technique].apply(pipe, **options) if technique else contextlib.nullcontext()
        with handle:
            out = pipe(
                prompt,
                num_inference_steps=STEPS,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil",
                **kwargs,
            )
        _REFERENCES[key] = np.asarray(out.images[0].convert("RGB"))
    return _REFERENCES[key]


def pixels(path) -> np.ndarray:
    with Image.open(Path(path)) as im:
        return np.asarray(im.convert("RGB"))
