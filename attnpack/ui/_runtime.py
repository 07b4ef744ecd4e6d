"""What every tab of the UI shares: the settings, model and file policy, the per-device lock, the pipeline cache,
per-request technique installation, output files, and turning failures into readable ``gr.Error`` messages.

Nothing here imports Gradio at module level or loads a model: the UI is built by :func:`attnpack.ui.build_demo`, and
a model is loaded on the first request that needs it.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import gc
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

__all__ = ["UIConfig", "Runtime", "installed", "default_loader", "user_errors", "device_lock", "MAX_SEED"]

MAX_SEED = 2**31 - 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# suffixes of weight files that are unpickled when loaded; the UI never loads them
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".joblib")


@dataclasses.dataclass
class UIConfig:
    """Settings of one UI instance (``attnpack ui`` options).

    Args:
        default_model: model selected when the page opens (a built-in name, a folder or a Hub id).
        models: the model names offered in the model picker (default: ``default_model`` and the built-in models).
        allowed_dirs: folders under which local model folders and weight / plan files may be loaded. Paths are
            resolved (symlinks and ``..`` included) before the check. ``default_model`` is always allowed.
        allow_hub: whether Hub ids (``org/name``) may be loaded (downloaded by ``from_pretrained``).
        device: device of the pipelines (``"cuda"``, ``"cuda:1"``, ``"cpu"``); names the request queue and lock.
        max_resolution: largest width / height in pixels a request may ask for.
        max_steps: most denoising steps a request may ask for.
        max_frames: most video frames a request may ask for.
        queue_size: how many requests may wait in the queue; more are refused with "queue is full".
        max_cached_models: how many pipelines stay loaded (least recently used ones are dropped first).
        output_dir: the folder in which the UI creates its own output folder, ``attnpack-ui-<time>-<id>``, and writes
            every result there (default: a temporary folder removed at exit). Nothing else in ``output_dir`` is
            ever served (see :attr:`Runtime.served_paths`).
    """

    default_model: str = "toy-flux"
    models: Sequence[str] | None = None
    allowed_dirs: Sequence[str | os.PathLike] = ()
    allow_hub: bool = True
    device: str | None = None
    max_resolution: int = 2048
    max_steps: int = 100
    max_frames: int = 257
    queue_size: int = 16
    max_cached_models: int = 1
    output_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        for name in ("max_resolution", "max_steps", "max_frames", "queue_size", "max_cached_models"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {name}={value!r}.")
        if self.max_resolution < 64:
            raise ValueError(f"`max_resolution` must be >= 64, got max_resolution={self.max_resolution}.")
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dirs = []
        for d in self.allowed_dirs:
            path = Path(d).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"`allowed_dirs` entry {str(d)!r} is not an existing folder.")
            dirs.append(path)
        self.allowed_dirs = tuple(dirs)
        for model in [self.default_model, *(self.models or ())]:
            if _model_kind(model) == "folder":
                _require_pipeline_folder(model)
        if self.models is None:
            from ..pipelines.loading import builtin_models

            self.models = list(dict.fromkeys([self.default_model, *builtin_models()]))
        elif self.default_model not in self.models:
            self.models = [self.default_model, *self.models]
        self.models = list(self.models)

    @property
    def queue_id(self) -> str:
        """Concurrency group of every event that uses the device: one request at a time per device."""
        return f"device:{self.device}"


# ------------------------------------------------------------------------------------------------ policy checks
def _inside(path: Path, folders: Sequence[Path]) -> bool:
    return any(path == d or d in path.parents for d in folders)


def _allowed_dirs_hint(config: UIConfig) -> str:
    if not config.allowed_dirs:
        return "no folders are allowed; start the UI with `attnpack ui --allow-dir FOLDER` to allow one"
    return "allowed folders: " + ", ".join(str(d) for d in config.allowed_dirs)


def _model_kind(choice: str) -> str:
    """``"builtin"``, ``"folder"`` (an existing path) or ``"hub"`` (``org/name``); anything else is an error."""
    from ..pipelines.loading import builtin_models

    if choice in builtin_models():
        return "builtin"
    if Path(choice).expanduser().exists():
        return "folder"
    if _HUB_ID.match(choice):
        return "hub"
    raise ValueError(
        f"`model` {choice!r} is neither a built-in model ({', '.join(builtin_models())}), an existing folder, "
        "nor a Hub id like 'org/name'."
    )


def _require_pipeline_folder(choice: str) -> Path:
    real = Path(choice).expanduser().resolve()
    if not (real / "model_index.json").is_file():
        raise ValueError(f"`model` {choice!r} is not a diffusers pipeline folder (it has no model_index.json).")
    return real


def resolve_model(choice: str, config: UIConfig) -> str:
    """Check a model picked in the UI against the policy; return the name to load (a folder as an absolute path).

    The models the UI was started with (``config.models``) and built-in names are always allowed; a local folder
    must lie inside one of ``config.allowed_dirs`` (after resolving symlinks and ``..``); a Hub id (``org/name``
    that is not a local path) needs ``config.allow_hub``. The errors never tell whether a path outside the allowed
    folders exists.
    """
    from ..pipelines.loading import builtin_models

    if not isinstance(choice, str) or not choice.strip():
        raise ValueError("`model` is empty; pick a built-in model, a local diffusers folder or a Hub id.")
    choice = choice.strip()
    if choice in (config.models or ()):
        return str(_require_pipeline_folder(choice)) if _model_kind(choice) == "folder" else choice
    if choice in builtin_models():
        return choice
    path = Path(choice).expanduser()
    real = path.resolve()
    if _inside(real, config.allowed_dirs):
        if not real.exists():
            raise ValueError(f"`model` folder {choice!r} does not exist.")
        return str(_require_pipeline_folder(choice))
    if _HUB_ID.match(choice) and not path.exists():
        if not config.allow_hub:
            raise ValueError(
                f"`model` {choice!r} is a Hub id, but this UI does not download models (started with --no-hub); "
                "pick a built-in model or a local folder."
            )
        return choice
    raise ValueError(
        f"`model` {choice!r} is not a built-in model ({', '.join(builtin_models())}), a Hub id like 'org/name', nor "
        f"a folder inside the folders this UI may load from ({_allowed_dirs_hint(config)})."
    )


def looks_like_path(text: str) -> bool:
    """Whether a text option value names a file (so that it must pass :func:`check_weights_file`): an absolute,
    home or relative path (``/``, ``~``, ``.``, a Windows ``\\``), a name with a weights suffix, or anything that
    exists on disk. Names such as ``int8`` or a head preset ``sd3-medium/dark`` are not paths."""
    text = text.strip()
    return (
        text.startswith(("/", "~", "."))
        or "\\" in text
        or text.lower().endswith((".safetensors", *PICKLE_SUFFIXES))
        or os.path.exists(text)
    )


def check_weights_file(value: str, config: UIConfig, *, argument: str) -> str:
    """A weights / plan file named in the UI: inside an allowed folder, a ``.safetensors`` file (never a pickle)."""
    path = Path(value.strip()).expanduser()
    real = path.resolve()
    if not real.name.lower().endswith(".safetensors"):
        raise ValueError(
            f"`{argument}`={value!r}: the UI loads weights only from .safetensors files (never pickle); "
            "convert the file with safetensors.torch.save_file."
        )
    if not _inside(real, config.allowed_dirs):
        raise ValueError(
            f"`{argument}`={value!r} is outside the folders this UI may load from ({_allowed_dirs_hint(config)})."
        )
    if not real.is_file():
        raise ValueError(f"`{argument}`={value!r} does not exist.")
    return str(real)


# ------------------------------------------------------------------------------------------------ loading
def default_loader(
    *, dtype: str = "auto", device: str | None = None, offload: str | None = None
) -> Callable[[str], Any]:
    """The loader ``attnpack ui`` uses: :func:`attnpack.load_pipeline` with safetensors-only weights."""

    def load(model: str):
        from ..pipelines.loading import load_pipeline

        try:
            return load_pipeline(model, dtype=dtype, device=device, offload=offload, use_safetensors=True)
        except OSError as exc:
            if ".safetensors" in str(exc):
                raise ValueError(
                    f"`model` {model!r} has no .safetensors weights for one of its components, and the UI never "
                    f"loads pickle weights (.bin, .pt, .ckpt). Convert the pipeline with "
                    f"`pipe.save_pretrained(folder, safe_serialization=True)`. ({str(exc).splitlines()[0]})"
                ) from None
            raise

    return load


_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def device_lock(device: str) -> threading.Lock:
    """One lock per device for the whole process: UI requests on one device never run at the same time, whichever
    demo or tab they come from (the Gradio queue already serialises them; this also covers direct calls)."""
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def user_errors(what: str = "Generation") -> Iterator[None]:
    """Turn failures into ``gr.Error`` with a readable message; the app keeps serving.

    User mistakes (``ValueError``, ``TypeError``, missing files, missing packages) show their message; running out of
    GPU memory frees the cache and says what to change; anything else is logged with its traceback and shown with its
    type.
    """
    import gradio as gr

    try:
        yield
    except gr.Error:
        raise
    except Exception as exc:
        if _is_oom(exc):
            _free_memory()
            logger.warning("%s ran out of GPU memory", what)
            raise gr.Error(
                f"{what} ran out of GPU memory. The app is still running: try a smaller width/height, fewer frames, "
                "a sparser technique, or start the UI with `--offload model`.",
                title="Out of memory",
                print_exception=False,
            ) from None
        if isinstance(exc, (ValueError, TypeError, OSError, ImportError)):
            message = str(exc).strip() or type(exc).__name__
            logger.warning("%s refused: %s", what, message.splitlines()[0])  # one line in the console, no traceback
            raise gr.Error(message, title="Invalid input", print_exception=False) from None
        logger.exception("%s failed", what)
        raise gr.Error(f"{what} failed: {type(exc).__name__}: {exc}", title="Error") from None


@contextlib.contextmanager
def installed(
    pipe, techniques: Sequence[tuple[Any, Mapping[str, Any]]] = (), attention_backend: str | None = None
) -> Iterator[Any]:
    """Install ``techniques`` (``[(Technique, parsed options)]``) and the attention backend on ``pipe`` for the
    block (:func:`attnpack.apply_techniques`); on exit, whatever happened, remove them (processors, hooks and weights
    restored). Yields the :class:`~attnpack.techniques.TechniquesHandle` (its ``parameters()`` go into outputs)."""
    from ..techniques import apply_techniques

    with apply_techniques(pipe, techniques, attention_backend) as handle:
        yield handle


def _new_output_dir(parent: str | os.PathLike | None) -> Path:
    """A new, empty folder for one UI's outputs: ``attnpack-ui-<time>-<id>`` inside ``parent`` (created if missing),
    or a temporary folder removed at exit. It never existed before, so it holds only what the UI writes into it."""
    if parent is None:
        folder = Path(tempfile.mkdtemp(prefix="attnpack-ui-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder
    parent = Path(parent).expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / f"attnpack-ui-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()  # fails rather than reuse a folder someone else made
    return folder


class Runtime:
    """The model cache and the device of one UI instance.

    ``loader(model) -> pipeline`` is called with a name that passed :func:`resolve_model` (a built-in name, an
    absolute folder or a Hub id). Pipelines are cached per name (at most ``config.max_cached_models``); techniques
    are installed per request and removed in ``finally`` (:func:`installed`), so a cached pipeline never carries one
    request's processors, hooks or weights into the next.
    """

    def __init__(self, loader: Callable[[str], Any], config: UIConfig):
        self.loader = loader
        self.config = config
        self.lock = device_lock(config.device)
        self._pipes: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.output_dir = _new_output_dir(config.output_dir)

    # -- models
    def loaded_models(self) -> list[str]:
        return list(self._pipes)

    def _pipeline(self, name: str):
        if name in self._pipes:
            self._pipes.move_to_end(name)
            return self._pipes[name]
        while len(self._pipes) >= self.config.max_cached_models:
            old, _ = self._pipes.popitem(last=False)
            logger.info("dropping cached pipeline %s", old)
            _free_memory()
        logger.info("loading %s", name)
        pipe = self.loader(name)
        self._pipes[name] = pipe
        return pipe

    @contextlib.contextmanager
    def session(self, model: str) -> Iterator[Any]:
        """Hold the device and yield the (cached or newly loaded) pipeline of ``model``, checked by
        :func:`resolve_model`. Install techniques inside with :func:`installed`."""
        name = resolve_model(model, self.config)
        with self.lock:
            yield self._pipeline(name)

    def generate(
        self,
        model: str,
        settings,
        techniques: Sequence[tuple[Any, Mapping[str, Any]]] = (),
        attention_backend: str | None = None,
        extra_parameters: Mapping[str, Any] | None = None,
    ) -> tuple[str | None, str | None, dict[str, Any]]:
        """One generation with ``techniques`` installed for it only; returns ``(image_path, video_path,
        parameters)`` (see :meth:`save`)."""
        from ..pipelines.generation import run_generation

        with self.session(model) as pipe, installed(pipe, techniques, attention_backend) as handle:
            result = run_generation(
                pipe, settings, extra_parameters={**handle.parameters(), **(extra_parameters or {})}
            )
        return (*self.save(result, settings.seed), result.parameters)

    # -- outputs
    @property
    def served_paths(self) -> list[str]:
        """What ``launch(allowed_paths=...)`` must get, and all it may get: the folder this runtime created for its
        own outputs. Every file in it was written by the UI; files the user keeps next to it in ``output_dir`` are
        never served (Gradio serves anything under an allowed path to whoever asks for it)."""
        return [str(self.output_dir.resolve())]

    def save(self, result, seed: int) -> tuple[str | None, str | None]:
        """Write the first image (PNG) or video (MP4, or GIF without imageio-ffmpeg) of a
        :class:`~attnpack.pipelines.generation.GenerationResult` with its parameters embedded, to a new file.

        Returns ``(image_path, video_path)``, one of them ``None``.
        """
        from .._utils import is_available
        from ..io import save_image, save_video

        if result.is_video:
            path = self.output_path(seed, ".mp4" if is_available("imageio_ffmpeg") else ".gif")
            save_video(result.images[0], path, result.parameters)
            return None, str(path)
        path = self.output_path(seed, ".png")
        save_image(result.images[0], path, result.parameters)
        return str(path), None

    def output_path(self, seed: int, suffix: str) -> Path:
        """A new file name for one output: never shared between requests."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.output_dir / f"{stamp}_{seed}_{uuid.uuid4().hex[:8]}{suffix}"
