"""Published attention heads for head-level perturbation guidance (HeadHunter), with what they do.

The heads come from the figures of *Where and How to Perturb: On the Design of Perturbation Guidance in Diffusion and
Flow Models* (Ahn, Kang et al., NeurIPS 2025; https://arxiv.org/abs/2506.10978). Labels were read from the paper's
figures (PDF text extraction), so treat the meanings as the authors' descriptions of single-head effects found with
``softness=1`` and ``scale=3`` (SD3) or ``8`` (FLUX), not as guarantees; the effects compose (e.g. dark + shearing).

Layer indices follow :func:`attnpack.attn_processors.head_perturbation.perturbable_layers`: SD3-medium has 24 joint
attention layers x 24 heads; FLUX.1-dev uses a global index over 19 double-stream blocks (0..18) then 38 single-stream
blocks (19..56), 24 heads each. The official FLUX plumbing is not public, so the FLUX ordering is the documented
convention of ``run_flux.sh`` (``--num_layers 57``), not verified against the authors' code.

Use a preset by name wherever heads are accepted::

    attnpack.apply_head_perturbation(pipe, heads="sd3-medium/dark", scale=3.0)
    attnpack.apply_head_perturbation(pipe, heads=["flux-dev/golden-hour", "L52H6"])
"""

from __future__ import annotations

import dataclasses


__all__ = ["HeadPreset", "PRESETS", "DEFAULT_PRESETS", "get_preset", "list_presets", "default_preset"]


@dataclasses.dataclass(frozen=True)
class HeadPreset:
    """A named set of heads.

    Attributes:
        name: ``"<model>/<effect>"``.
        model: the weights the heads were found on (Hub id).
        heads: ``(layer, head)`` pairs.
        meaning: the visual effect reported by the paper.
        source: where in the paper.
    """

    name: str
    model: str
    heads: tuple[tuple[int, int], ...]
    meaning: str
    source: str

    @property
    def spec(self) -> list[str]:
        """The heads as ``["L1H10", ...]``."""
        return [f"L{layer}H{head}" for layer, head in self.heads]


SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
# found by HeadHunter's greedy search on toy-flux with the `toy-adherence` objective (benchmarks/toy_heads.py, 2 rounds
# of 2 heads, 8 two-object prompts x 2 seeds); held-out scores in benchmarks/results/toy_heads.json
TOY_FLUX_HEADS = "L3H3,L0H0,L5H1,L1H2"


def _p(name: str, model: str, heads: str, meaning: str, source: str) -> HeadPreset:
    pairs = []
    for item in heads.split(","):
        layer, head = item.strip().lstrip("L").split("H")
        pairs.append((int(layer), int(head)))
    return HeadPreset(name, model, tuple(pairs), meaning, source)


_ALL = [
    # ------------------------------------------------------------------ SD3-medium (24 x 24)
    _p("sd3-medium/dark", SD3_MEDIUM, "L1H2,L1H10", "dark, low-key lighting (the 'dark' pair)", "Fig. 3, Fig. 36"),
    _p("sd3-medium/lighting", SD3_MEDIUM, "L1H10", "dark / dramatic lighting (single head)", "Fig. 3"),
    _p("sd3-medium/shearing", SD3_MEDIUM, "L11H15", "shearing (slanted geometry)", "Fig. 3"),
    _p("sd3-medium/shadow", SD3_MEDIUM, "L13H17", "strong shadows", "Fig. 3"),
    _p("sd3-medium/blue", SD3_MEDIUM, "L0H23", "blue colour cast", "Fig. 3"),
    _p("sd3-medium/white", SD3_MEDIUM, "L0H15,L1H19", "white, bright palette (the 'white' pair)", "Fig. 36"),
    _p("sd3-medium/red", SD3_MEDIUM, "L0H3", "red colour cast", "Fig. 32"),
    _p("sd3-medium/banding", SD3_MEDIUM, "L16H3", "horizontal banding", "Fig. 32"),
    _p("sd3-medium/neon-detail", SD3_MEDIUM, "L14H7,L14H17", "high-resolution detail with rainbow neon", "Fig. 32"),
    _p(
        "sd3-medium/sunlit",
        SD3_MEDIUM,
        "L18H11,L0H17,L2H3",
        "'sunlit, warm glow, golden hour' style (search rounds 1-3)",
        "Fig. 8",
    ),
    _p(
        "sd3-medium/spring-bloom",
        SD3_MEDIUM,
        "L0H2,L1H11,L2H3",
        "'spring bloom, fresh vibrant colors' style",
        "Fig. 21",
    ),
    # ------------------------------------------------------------------ FLUX.1-dev (57 x 24, global index)
    _p("flux-dev/golden-hour", FLUX_DEV, "L38H18", "golden-hour light", "Fig. 33, Fig. 35"),
    _p("flux-dev/green-filter", FLUX_DEV, "L52H12", "green colour filter", "Fig. 33, Fig. 35"),
    _p("flux-dev/glossy", FLUX_DEV, "L43H17", "glossy, plastic look", "Fig. 33, Fig. 35"),
    _p("flux-dev/warm-red", FLUX_DEV, "L52H22", "warm red palette", "Fig. 33, Fig. 35"),
    _p("flux-dev/vintage-film", FLUX_DEV, "L51H23", "vintage film", "Fig. 33, Fig. 35"),
    _p("flux-dev/bokeh", FLUX_DEV, "L34H0", "smooth bokeh", "Fig. 33, Fig. 35"),
    _p("flux-dev/cool-tone", FLUX_DEV, "L52H6", "cool colour tone", "Fig. 33, Fig. 35"),
    _p("flux-dev/autumn-cinematic", FLUX_DEV, "L54H23", "autumnal, cinematic grading", "Fig. 33, Fig. 35"),
    _p("flux-dev/rgb-split", FLUX_DEV, "L51H16", "RGB split (chromatic aberration)", "Fig. 33, Fig. 35"),
    # ------------------------------------------------------------------ the built-in toy-flux (6 layers x 4 heads)
    _p(
        "toy-flux/searched",
        "toy-flux",
        TOY_FLUX_HEADS,
        "found by attnpack's head search for prompt adherence on 8 two-object prompts; on held-out prompts it lowers "
        "adherence (single objects 0.91 -> 0.74 at scale 3): shows head guidance acting, not a quality gain",
        "benchmarks/toy_heads.py, benchmarks/results/toy_heads.json",
    ),
]

PRESETS: dict[str, HeadPreset] = {p.name: p for p in _ALL}

# the heads head guidance uses when none are given, per built-in model
DEFAULT_PRESETS: dict[str, str] = {"toy-flux": "toy-flux/searched"}


def default_preset(model: str | None) -> str | None:
    """The preset name head guidance uses on the built-in ``model`` when no heads are given, else ``None``."""
    return DEFAULT_PRESETS.get(model) if model else None


def get_preset(name: str) -> HeadPreset:
    """The preset ``name`` (e.g. ``"sd3-medium/dark"``), or a ``ValueError`` listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"Unknown head preset {name!r}. Presets: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]


def list_presets(model: str | None = None) -> list[HeadPreset]:
    """All presets, or those found on ``model`` (a Hub id, or ``"sd3-medium"`` / ``"flux-dev"``)."""
    if model is None:
        return list(_ALL)
    return [p for p in _ALL if p.model == model or p.name.startswith(f"{model}/")]
