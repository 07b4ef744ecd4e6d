"""Atomic writes and embedded parameters."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from attnpack.io import atomic_path, check_complete, check_output_path, read_parameters, save_image, save_video


def test_png_roundtrip(tmp_path):
    path = save_image(np.random.rand(8, 8, 3), tmp_path / "a.png", {"seed": 3, "prompt": "x"})
    assert read_parameters(path) == {"prompt": "x", "seed": 3}
    with Image.open(path) as im:
        assert im.size == (8, 8)


def test_gif_roundtrip(tmp_path):
    frames = [np.random.rand(8, 8, 3) for _ in range(3)]
    path = save_video(frames, tmp_path / "a.gif", {"frames": 3})
    assert read_parameters(path) == {"frames": 3}
    with Image.open(path) as im:
        assert im.n_frames == 3


def test_mp4_roundtrip(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    frames = [np.full((16, 16, 3), i / 4) for i in range(4)]
    path = save_video(frames, tmp_path / "a.mp4", {"model": "tiny-wan", "note": "a=b;c"})
    assert read_parameters(path) == {"model": "tiny-wan", "note": "a=b;c"}


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["keep.png"]


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "x.png", (".png",)) == tmp_path / "x.png"
    with pytest.raises(ValueError, match="must end with .png"):
        check_output_path(tmp_path / "x.jpg", (".png",))
    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "x.png", (".png",))
    with pytest.raises(ValueError, match="is a folder"):
        (tmp_path / "d.png").mkdir()
        check_output_path(tmp_path / "d.png", (".png",))


def test_parameters_are_json(tmp_path):
    path = save_image(np.zeros((4, 4, 3)), tmp_path / "b.png", {"t": (1, 2)})
    with Image.open(path) as im:
        assert json.loads(im.info["parameters"]) == {"t": [1, 2]}


def test_written_files_get_normal_permissions(tmp_path):
    """Outputs are readable like any new file (0666 minus the umask), not owner-only like temporary files; a
    replaced file keeps its mode."""
    mask = os.umask(0o027)
    os.umask(mask)
    path = save_image(np.zeros((4, 4, 3)), tmp_path / "new.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    path.chmod(0o640)
    save_image(np.ones((4, 4, 3)), path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_training_state_round_trip(tmp_path):
    """save_state / load_state keep every type a torch state dict uses: tuples, int keys, bool vs int, NaN, dtypes,
    0-d and empty tensors, tensors sharing memory; other objects are refused when writing."""
    import torch
    from safetensors import safe_open

    from attnpack.io import load_state, save_state

    shared = torch.arange(6.0)
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": shared}, 1: {}},
                      "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "foreach": None, "params": [0, 1]}]},
        "same": shared, "view": shared[2:4], "half": torch.ones(2, 3, dtype=torch.bfloat16),
        "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "flags": [True, 1, 1.0, float("nan")],
        "__tensor__": "a key that looks like a marker", (1, 2): "tuple key",
    }  # fmt: skip
    path = save_state(tmp_path / "s.safetensors", state, "test")
    loaded = load_state(path, "test")
    assert loaded.keys() == state.keys() and list(loaded["optimizer"]["state"]) == [0, 1]
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    flags = loaded["flags"]
    assert (
        [type(f) for f in flags] == [bool, int, float, float] and flags[:3] == [True, 1, 1.0] and flags[3] != flags[3]
    )
    for key in ("same", "view", "half", "mask", "empty"):
        assert loaded[key].dtype == state[key].dtype and torch.equal(loaded[key], state[key]), key
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], shared)
    assert loaded["__tensor__"] == state["__tensor__"] and loaded[(1, 2)] == "tuple key"
    with safe_open(str(path), framework="pt") as fh:  # tensors under the keys of their places in the state
        assert "state/optimizer/state/0/exp_avg" in fh.keys() and fh.metadata()["format"] == "test"
    with pytest.raises(TypeError, match="cannot store a object at 'state/x'"):
        save_state(tmp_path / "t.safetensors", {"x": object()}, "test")
    with pytest.raises(ValueError, match="is not of kind 'other'"):
        load_state(path, "other")


@pytest.mark.parametrize("suffix", [".png", ".gif", ".mp4"])
def test_check_complete_finds_every_cut(tmp_path, suffix):
    """A file cut short anywhere is found, also where its parameters still read (they come first in PNG and GIF)."""
    if suffix == ".mp4":
        pytest.importorskip("imageio_ffmpeg")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(5)]
    path = tmp_path / f"x{suffix}"
    if suffix == ".png":
        save_image(frames[0], path, {"seed": 1})
    else:
        save_video(frames, path, {"seed": 1})
    check_complete(path)  # a complete file passes
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    for keep in (len(data) - 1, len(data) - 12, len(data) - 13, len(data) - 200, len(data) // 2, 10, 0):
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=f"^cut{suffix} is incomplete or damaged: "):
            check_complete(cut)
    cut.write_bytes(data[:-13])
    if suffix != ".mp4":
        assert read_parameters(cut) == {"seed": 1}  # what --skip-existing looked at before: it kept such files
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF  # a flipped byte inside the image data
    cut.write_bytes(bytes(damaged))
    if suffix == ".png":  # checksummed; GIF and MP4 frame data carry no checksum, a flipped byte may decode
        with pytest.raises(ValueError, match="incomplete or damaged"):
            check_complete(cut)
