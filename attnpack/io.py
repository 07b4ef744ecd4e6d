"""Atomic output writing with generation parameters embedded (PNG tEXt, GIF comment, MP4 metadata); safetensors files
read with errors that name the file; training states (checkpoints) stored as safetensors + JSON, never pickle."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin


__all__ = [
    "atomic_path",
    "check_output_path",
    "save_image",
    "save_video",
    "read_parameters",
    "read_safetensors",
    "read_torch_tensors",
    "save_state",
    "load_state",
    "check_state_fields",
    "pickle_checkpoint_error",
    "check_complete",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
]

IMAGE_SUFFIXES = (".png",)
VIDEO_SUFFIXES = (".gif", ".mp4")
PARAMETERS_KEY = "parameters"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


def check_output_path(path: str | os.PathLike, suffixes: Sequence[str], *, argument: str = "--out") -> Path:
    """Validate an output path before any work is done: known suffix, existing writable folder."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"`{argument}` must end with {' or '.join(suffixes)}, got {str(path)!r}.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"`{argument}` folder {str(parent)!r} does not exist; create it first.")
    if path.is_dir():
        raise ValueError(f"`{argument}` {str(path)!r} is a folder; give a file name.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"`{argument}` folder {str(parent)!r} is not writable.")
    try:  # the real test (access() says yes to root everywhere, also in /proc): create and remove a file there
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"`{argument}` folder {str(parent)!r} is not writable: {exc.strerror or exc}.") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On failure the temporary file is removed, so ``path`` is either the complete new file or untouched. The new file
    gets the permissions of the file it replaces, or those of a newly created file (0666 minus the umask), not the
    owner-only mode of temporary files.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _to_uint8(frame) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    return arr


def save_image(image, path: str | os.PathLike, parameters: dict[str, Any] | None = None) -> Path:
    """Write ``image`` (PIL, or HWC float in [0, 1] / uint8) as PNG atomically, with ``parameters`` as JSON tEXt."""
    path = Path(path)
    pil = image if isinstance(image, Image.Image) else Image.fromarray(_to_uint8(image))
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True, default=str))
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG", pnginfo=info)
    return path


MAX_FPS = 240


def save_video(frames, path: str | os.PathLike, parameters: dict[str, Any] | None = None, fps: int = 8) -> Path:
    """Write video ``frames`` (list of PIL / HWC arrays, or ``[F, H, W, C]``) as GIF or MP4, atomically.

    GIF stores ``parameters`` in its comment extension; MP4 (needs ``imageio-ffmpeg``: ``pip install
    attnpack[video]``) stores it in the container's ``comment`` metadata.
    """
    from ._utils import check_number

    fps = check_number("fps", fps, 1, MAX_FPS, integer=True)
    path = Path(path)
    arrays = [_to_uint8(f) for f in frames]
    text = json.dumps(parameters or {}, sort_keys=True, default=str)
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(a) for a in arrays]
        with atomic_path(path) as tmp:
            images[0].save(
                tmp,
                format="GIF",
                save_all=True,
                append_images=images[1:],
                duration=int(1000 / fps),
                loop=0,
                comment=text.encode("utf-8"),
            )
        return path
    if path.suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg
        except ImportError:
            raise ImportError(
                "Writing MP4 needs `imageio-ffmpeg`. Install it with `pip install attnpack[video]`, or write a .gif."
            ) from None
        h, w = arrays[0].shape[:2]
        with atomic_path(path) as tmp:
            writer = imageio_ffmpeg.write_frames(
                str(tmp),
                (w, h),
                fps=fps,
                codec="libx264",
                pix_fmt_out="yuv420p",
                macro_block_size=1,
                output_params=["-metadata", f"comment={text}", "-f", "mp4"],
                ffmpeg_log_level="error",
            )
            writer.send(None)
            for a in arrays:
                writer.send(np.ascontiguousarray(a[..., :3]))
            writer.close()
        return path
    raise ValueError(f"Unsupported video suffix {path.suffix!r}; use .gif or .mp4.")


def read_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """Read the generation parameters embedded by :func:`save_image` / :func:`save_video`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".png", ".gif"):
        with Image.open(path) as im:
            raw = im.info.get(PARAMETERS_KEY) if suffix == ".png" else im.info.get("comment")
        if raw is None:
            raise ValueError(f"{str(path)!r} has no embedded attnpack parameters.")
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    if suffix == ".mp4":
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        out = subprocess.run(
            [exe, "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines():
            if line.startswith("comment="):
                return json.loads(line[len("comment=") :].replace("\\=", "=").replace("\\;", ";").replace("\\#", "#"))
        raise ValueError(f"{str(path)!r} has no embedded attnpack parameters.")
    raise ValueError(f"Cannot read parameters from {suffix!r} files.")


# the last bytes of every complete file: PNG's IEND chunk (length 0, type, CRC), GIF's trailer
_TRAILERS = {".png": b"\x00\x00\x00\x00IEND\xaeB`\x82", ".gif": b"\x3b"}


def _mp4_boxes_end_at_file_end(path: Path) -> bool:
    """Whether the MP4's top-level boxes (4-byte size, type; size 1: a 64-bit size follows; 0: to the end) tile the
    file exactly: a cut anywhere leaves the last box longer than what remains."""
    end, pos = path.stat().st_size, 0
    with open(path, "rb") as fh:
        while pos < end:
            fh.seek(pos)
            header = fh.read(16)
            size = int.from_bytes(header[:4], "big") if len(header) >= 8 else -1
            if size == 1:
                size = int.from_bytes(header[8:16], "big") if len(header) == 16 else -1
            elif size == 0:
                size = end - pos
            if size < 8 or pos + size > end:
                return False
            pos += size
    return end > 0


def check_complete(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless the PNG, GIF or MP4 at ``path`` decodes completely.

    A file cut short (a copy or a sync that stopped, a full disk, a tool that does not write atomically) may still
    carry its parameters, which come first in PNG and GIF files; so :func:`read_parameters` alone does not show it.
    PNG and GIF: the format's last bytes, then every frame decoded (and, for PNG, every chunk's checksum). MP4: the
    top-level boxes end exactly at the end of the file, then every frame decoded by ffmpeg, with no error reported.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in _TRAILERS:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - len(_TRAILERS[suffix])))
                if fh.read() != _TRAILERS[suffix]:
                    raise ValueError(f"the file does not end like a complete {suffix[1:].upper()} file")
            with Image.open(path) as im:
                for frame in range(getattr(im, "n_frames", 1)):
                    im.seek(frame)
                    im.load()
            if suffix == ".png":
                with Image.open(path) as im:
                    im.verify()  # chunk checksums: what load() does not look at
        elif suffix == ".mp4":
            import imageio_ffmpeg

            if not _mp4_boxes_end_at_file_end(path):
                raise ValueError("its last MP4 box runs past the end of the file")

            done = subprocess.run(
                [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0 or done.stderr.strip():
                raise ValueError((done.stderr.strip().splitlines() or [f"ffmpeg exit status {done.returncode}"])[-1])
        else:
            raise ValueError(f"cannot check {suffix!r} files; attnpack writes .png, .gif and .mp4")
    except (OSError, SyntaxError, EOFError, ValueError) as exc:  # PIL reports broken files with all of these
        raise ValueError(f"{path.name} is incomplete or damaged: {exc}") from None


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` onto ``dst`` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


# ------------------------------------------------------------------------------------------------- safetensors
def _shown(path: Path) -> str:
    shown = repr(str(path))
    if path.is_symlink():
        shown += f" (a link to {os.path.realpath(path)!r})"
    return shown


_HEADER_HINTS = {  # safetensors' words for a damaged header -> what they mean for the user
    "header too large": "its first 8 bytes are no safetensors header length, so it is another kind of file",
    "invalid header length": "it ends inside its header",
    "incomplete metadata, file not fully covered": "its size does not match the tensor data its header lists "
    "(truncated, or offsets past the end of the file)",
}


def read_safetensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; any problem with the file is one ``ValueError`` naming it.

    ``what`` names the file in messages (e.g. ``"`weights` file"``, ``"PARO plan"``). A missing path, a folder, a
    device, an empty, truncated or renamed file (a pickle, a text file), a header that is not UTF-8 JSON or whose
    offsets run past the end of the file: all raise ``ValueError("<what> '<path>' ...")``, never a
    ``SafetensorError`` or an ``OSError``. Nothing is unpickled. Tensors are on the CPU.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    shown = _shown(path)
    if not path.exists():
        raise ValueError(f"{what} {shown} does not exist; check the path.")
    if not path.is_file():
        raise ValueError(f"{what} {shown} is not a regular file (a folder or a device); give a .safetensors file.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ValueError(f"{what} {shown} cannot be read ({exc.strerror or exc}).") from None
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        reason = str(exc).removeprefix("Error while deserializing header: ") or type(exc).__name__
        reason = f"{_HEADER_HINTS[reason]}: {reason}" if reason in _HEADER_HINTS else reason
        if not head:
            reason = "the file is empty"
        elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            reason += "; it looks like a pickle (torch.save) file, which attnpack never loads: pickles can run code"
        raise ValueError(f"{what} {shown} is not a valid safetensors file ({reason}).") from None
    return tensors, metadata


def read_torch_tensors(path: str | os.PathLike, what: str = "file", fix: str = "") -> dict[str, Any]:
    """The ``{name: tensor}`` dict of a ``torch.save`` file, read only with ``torch.load(..., weights_only=True)``.

    For files of other projects that ship plain tensors as pickles (e.g. the official PAROAtten plans). The restricted
    unpickler builds tensors, numbers, strings and containers only; anything else (a class, a function, a module
    object) is refused, and nothing in the file runs. Every problem (missing file, not a torch file, objects other
    than tensors, not a dict of tensors) is one ``ValueError`` naming ``what``, the file and ``fix``. Tensors are on
    the CPU (memory-mapped when the file allows it).
    """
    import pickle

    import torch

    path = Path(path).expanduser()
    shown = _shown(path)
    fix = f" {fix}" if fix else ""
    if not path.exists():
        raise ValueError(f"{what} {shown} does not exist; check the path.{fix}")
    if not path.is_file():
        raise ValueError(f"{what} {shown} is not a regular file (a folder or a device).{fix}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {shown} is empty: it is not a file written by torch.save.{fix}")

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            value = load(True)
        except RuntimeError as exc:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            value = load(False)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "not an allowed global" in text:  # a class or function in the pickle
            raise ValueError(
                f"{what} {shown} holds objects other than tensors, numbers and containers, which "
                "torch.load(weights_only=True) refuses (unpickling them could run code): attnpack does not load it. "
                f"Re-save it as a dict of tensors (torch.save({{'name': tensor, ...}}, path)).{fix}"
            ) from None
        reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip() else "unreadable"
        raise ValueError(f"{what} {shown} is not a file written by torch.save ({reason[:200]}).{fix}") from None
    except (RuntimeError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {shown} is not a file written by torch.save ({reason[:200]}).{fix}") from None
    except OSError as exc:
        raise ValueError(f"{what} {shown} cannot be read ({exc.strerror or exc}).{fix}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(
            f"{what} {shown} holds a {type(value).__name__}, not a dict of named tensors "
            f"(torch.save({{'name': tensor, ...}})).{fix}"
        )
    bad = [k for k, v in value.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{what} {shown}: entry {bad[0]!r} is a {type(value[bad[0]]).__name__}, not a tensor.{fix}")
    return value


# ------------------------------------------------------------------------------------------------- training states
# A training state (weights, optimizer and LR-scheduler state dicts, step, losses, config) is one safetensors file:
# every tensor under the key of its place in the state ("optimizer/state/0/exp_avg"), and the rest of the structure
# as JSON in the metadata entry "state", where a tensor is {"__tensor__": key}, a tuple {"__tuple__": [...]} and a
# dict with keys other than plain strings {"__dict__": [[key, value], ...]}. Loading builds only dicts, lists,
# tuples, strings, numbers, booleans, None and tensors: no code runs, whoever wrote the file.
STATE_VERSION = 1
_MARKERS = ("__tensor__", "__tuple__", "__dict__")


def save_state(path: str | os.PathLike, state: dict[str, Any], kind: str) -> Path:
    """Write ``state`` (nested dicts / lists / tuples of tensors, str, int, float, bool, None) to ``path``
    atomically as safetensors + JSON; ``kind`` is stored and checked by :func:`load_state`."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            ptr = tensor.untyped_storage().data_ptr()
            if tensor.numel() and ptr in storages:  # safetensors refuses tensors sharing memory
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            key, n = where, 1
            while key in tensors:
                key, n = f"{where}#{n}", n + 1
            tensors[key] = tensor
            return {"__tensor__": key}
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        if isinstance(value, (list, tuple)):
            items = [encode(v, f"{where}/{i}") for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"__tuple__": items}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not any(m in value for m in _MARKERS):
                return {k: encode(v, f"{where}/{k}") for k, v in value.items()}
            return {"__dict__": [[encode(k, f"{where}/key"), encode(v, f"{where}/{k}")] for k, v in value.items()]}
        raise TypeError(f"cannot store a {type(value).__name__} at {where!r} in a training state file.")

    text = json.dumps(encode(state, "state"), allow_nan=True)
    metadata = {"format": kind, "version": str(STATE_VERSION), "state": text}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_state(path: str | os.PathLike, kind: str, what: str = "checkpoint") -> dict[str, Any]:
    """Read a file written by :func:`save_state` with the same ``kind``; tensors are fresh CPU copies.

    A damaged, foreign or newer file raises ``ValueError`` naming it (see :func:`read_safetensors`).
    """
    tensors, metadata = read_safetensors(path, what)
    shown = _shown(Path(path))
    if metadata.get("format") != kind:
        raise ValueError(f"{what} {shown} is not of kind {kind!r} (its format entry is {metadata.get('format')!r}).")
    version = metadata.get("version", "")
    if not version.isdigit() or int(version) > STATE_VERSION:
        raise ValueError(
            f"{what} {shown} has format version {version!r}; this attnpack reads versions up to {STATE_VERSION}. "
            "Upgrade attnpack, or start over without resuming."
        )
    try:
        raw = json.loads(metadata.get("state", ""))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} {shown} is damaged: its 'state' metadata is not JSON ({exc}).") from None
    used: set[str] = set()

    def decode(value: Any, where: str) -> Any:
        if isinstance(value, list):
            return [decode(v, where) for v in value]
        if not isinstance(value, dict):
            return value
        marker = [m for m in _MARKERS if m in value]
        if not marker:
            return {k: decode(v, f"{where}/{k}") for k, v in value.items()}
        inner = value[marker[0]]
        if len(value) == 1 and marker == ["__tensor__"] and isinstance(inner, str) and inner in tensors:
            used.add(inner)
            return tensors[inner].clone()  # fresh, aligned memory, not a view of the mapped file
        if len(value) == 1 and marker == ["__tuple__"] and isinstance(inner, list):
            return tuple(decode(v, where) for v in inner)
        if len(value) == 1 and marker == ["__dict__"] and isinstance(inner, list):
            if all(isinstance(p, list) and len(p) == 2 for p in inner):
                pairs = [(decode(k, where), decode(v, where)) for k, v in inner]
                with contextlib.suppress(TypeError):  # unhashable keys
                    return dict(pairs)
        raise ValueError(f"{what} {shown} is damaged: bad entry {json.dumps(value)[:120]} under {where!r}.")

    try:
        state = decode(raw, "state")
    except RecursionError:
        raise ValueError(f"{what} {shown} is damaged: its state is nested too deeply.") from None
    unused = sorted(set(tensors) - used)
    if not isinstance(state, dict) or unused:
        problem = f"holds tensors its state does not use ({', '.join(unused[:3])})" if unused else "has no state"
        raise ValueError(f"{what} {shown} is damaged: it {problem}.")
    return state


def check_state_fields(state: dict[str, Any], fields: dict[str, type | tuple], path, what: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming ``path`` unless ``state[name]`` exists and is an instance of ``fields[name]`` for
    every field (``bool`` never counts as ``int``)."""
    for name, kinds in fields.items():
        value = state.get(name, KeyError)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if value is KeyError or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            found = "nothing" if value is KeyError else type(value).__name__
            expect = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{what} {_shown(Path(path))} is damaged: {name!r} should be {expect}, found {found}.")


def pickle_checkpoint_error(path: str | os.PathLike) -> ValueError:
    """The error for a checkpoint in the pickle format of earlier attnpack versions, which is never loaded."""
    return ValueError(
        f"{str(path)!r} is a checkpoint in the pickle format (torch.save) of earlier attnpack versions: loading "
        "it could run arbitrary code, so attnpack no longer reads it (checkpoints are now safetensors + JSON). "
        "Delete it, pass --no-resume (resume=False) to start over, or use another output folder."
    )
