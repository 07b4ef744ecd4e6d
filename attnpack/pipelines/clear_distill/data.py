"""Training data of CLEAR distillation: prompt files, image folders, teacher samples, and the cache of text
embeddings and VAE latent statistics that training reads."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ...io import atomic_path
from .config import ClearDistillConfig


logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a ``.txt`` (one per non-empty line) or ``.jsonl`` (objects with ``"prompt"``) file."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(lines):
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'`prompts` {str(path)!r} line {i + 1}: expected an object with a "prompt" string.')
            prompts.append(row["prompt"])
    else:
        prompts = lines
    if not prompts:
        raise ValueError(f"`prompts` file {str(path)!r} holds no prompts.")
    return prompts


def find_image_prompts(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(image, prompt)`` pairs of a folder: each image with a same-named ``.txt`` (the prompt) or ``.json``
    (``{"prompt": ...}``, the official data format). Sorted by file name."""
    folder = Path(folder)
    items = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        txt, js = image.with_suffix(".txt"), image.with_suffix(".json")
        if txt.is_file():
            prompt = txt.read_text(encoding="utf-8").strip()
        elif js.is_file():
            prompt = json.loads(js.read_text(encoding="utf-8")).get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f'{str(js)!r} has no "prompt" string.')
        else:
            raise ValueError(f"image {str(image)!r} has no prompt file: add {txt.name} (or {js.name}).")
        items.append((image, prompt))
    if not items:
        raise ValueError(f"`data` folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return items


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    """``[1, 3, R, R]`` in [-1, 1]: shorter side resized to ``resolution`` (bicubic), then centre-cropped."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _shard(n: int, rank: int, world: int) -> range:
    return range(rank, n, world)


def generate_samples(pipe, prompts: list[str], out_dir: Path, cfg: ClearDistillConfig, rank=0, world=1, show=True):
    """Teacher samples ``out_dir/{i:05d}.png`` + ``.txt`` (existing ones are kept: an interrupted run resumes)."""
    from ...io import save_image

    out_dir.mkdir(parents=True, exist_ok=True)
    n = cfg.num_samples or len(prompts)
    todo = [i for i in _shard(n, rank, world) if not (out_dir / f"{i:05d}.txt").is_file()]
    pipe.set_progress_bar_config(disable=True)
    for i in tqdm(todo, desc="teacher samples", disable=not show):
        prompt = prompts[i % len(prompts)]
        image = pipe(
            prompt=prompt,
            height=cfg.resolution,
            width=cfg.resolution,
            num_inference_steps=cfg.sample_steps,
            guidance_scale=cfg.sample_guidance,
            max_sequence_length=cfg.max_sequence_length,
            generator=torch.Generator("cpu").manual_seed(cfg.seed + i),
        ).images[0]
        save_image(image, out_dir / f"{i:05d}.png", {"prompt": prompt, "seed": cfg.seed + i, "model": cfg.model})
        with atomic_path(out_dir / f"{i:05d}.txt") as tmp:  # written last: marks the sample complete
            tmp.write_text(prompt, encoding="utf-8")


def cache_samples(pipe, items: list[tuple[Path, str]], cache_dir: Path, cfg: ClearDistillConfig, rank=0, world=1,
                  show=True) -> list[Path]:  # fmt: skip
    """Cache T5 / CLIP prompt embeddings and the VAE latent mean / std of every item (one safetensors file each)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [cache_dir / f"{i:06d}_{image.stem}.safetensors" for i, (image, _) in enumerate(items)]

    def meta(image: Path, prompt: str) -> dict[str, str]:
        st = image.stat()
        return {"image": str(image), "size": str(st.st_size), "mtime": str(int(st.st_mtime)), "prompt": prompt,
                "resolution": str(cfg.resolution), "max_sequence_length": str(cfg.max_sequence_length),
                "model": cfg.model}  # fmt: skip

    def fresh(path: Path, expect: dict[str, str]) -> bool:
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() == expect

    device = pipe.vae.device
    todo = [i for i in _shard(len(items), rank, world) if not fresh(paths[i], meta(*items[i]))]
    for i in tqdm(todo, desc="caching latents and text", disable=not show):
        image, prompt = items[i]
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=[prompt], prompt_2=None, device=device, max_sequence_length=cfg.max_sequence_length
            )
            pixels = _load_image(image, cfg.resolution).to(device=device, dtype=pipe.vae.dtype)
            dist = pipe.vae.encode(pixels).latent_dist
        tensors = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0], "mean": dist.mean[0],
                   "std": dist.std[0]}  # fmt: skip
        with atomic_path(paths[i]) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), meta(image, prompt))
    return paths


class CachedSamples:
    """The cached items; batches are drawn by global position (epoch permutations seeded by ``seed``)."""

    def __init__(self, paths: list[Path], seed: int):
        self.paths = paths
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def index(self, position: int) -> int:
        n = len(self.paths)
        epoch = position // n
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            }
        return int(self._perms[epoch][position % n])

    def load(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        rows = [load_file(str(self.paths[self.index(p)])) for p in positions]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ------------------------------------------------------------------------------------------------- the loss
