"""Arguments shared by the subcommands that load a model."""

from __future__ import annotations

import argparse
import json

from ..pipelines.loading import builtin_models


DEFAULT_MODEL = "toy-flux"  # trained in-house, shipped in the package: meaningful images with no download


def add_model_args(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    """The model group; ``default`` is the ``--model`` default (commands limited to other families pass theirs)."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "-m",
        "--model",
        default=default,
        help=f"built-in name ({', '.join(builtin_models())}), local diffusers folder or Hub id (default: {default})",
    )
    g.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16 (default: auto)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--offload", choices=["model", "sequential"], default=None, help="CPU offload (needs a GPU)")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--revision", default=None, help="Hub revision")
    g.add_argument(
        "--attention-backend",
        default=None,
        help="diffusers attention backend for dense attention (sdpa = native, flash, sage, xformers, flex, ...)",
    )


def add_technique_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("techniques")
    g.add_argument(
        "-t",
        "--technique",
        action="append",
        default=[],
        help="technique to apply (repeatable); `attnpack info` lists them",
    )
    g.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="technique option, named as in the Python API (repeatable; technique.key=value with several techniques)",
    )
    g.add_argument(
        "--techniques",
        default=None,
        metavar="JSON",
        help='techniques as JSON, e.g. \'[{"name": "gna", "window_size": [13, 13]}]\'',
    )


def technique_specs(args) -> list:
    from ..techniques import parse_technique_specs

    return parse_technique_specs(args.technique, args.opt, args.techniques)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"max_sequence_length\": 256}'")
    return value


def load_from_args(args):
    from ..pipelines.loading import load_pipeline

    return load_pipeline(
        args.model,
        dtype=args.dtype,
        device=args.device,
        offload=args.offload,
        variant=args.variant,
        revision=args.revision,
    )


def set_attention_backend(pipe, backend: str | None):
    """Select a diffusers attention backend for every attention layer (see
    :func:`attnpack.attn_processors.set_attention_backend`); returns a handle, or ``None`` without a backend."""
    if backend is None:
        return None
    from ..attn_processors.processor import set_attention_backend as _set

    return _set(pipe, backend)
