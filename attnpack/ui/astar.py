"""The A-STAR tab: test-time attention segregation and retention (https://arxiv.org/abs/2306.14544) on SD 1.x/2.x and
SDXL models, through :class:`attnpack.AStarPipeline` / :class:`attnpack.AStarXLPipeline` made from the cached pipeline
(``from_pipe``: same weights). API endpoints ``/astar`` and ``/astar_tokens``.

The concepts to keep apart and present are words of the prompt, or token positions; **Show tokens** lists the
prompt's tokens with their positions and fills a picker with the prompt's words. The result is shown next to the
stock image at the same seed (the same pipeline with no latent update: exactly what the plain pipeline makes), with
every concept's cross-attention map per step for both.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from ._layout import (
    TOY_EXAMPLES_LABEL,
    advanced_settings,
    checked_request,
    labelled_grid,
    model_picker,
    number,
    parameters_panel,
    prompt_row,
    request_settings,
)
from ._runtime import Runtime, UIConfig, user_errors


__all__ = ["build_astar_tab", "parse_concepts", "parse_token_indices", "astar_options", "EXAMPLES"]

SETTING_INPUTS = ("negative_prompt", "seed", "randomize_seed", "width", "height", "steps", "guidance")
CONTRASTS = ("max", "minmax")
LOSS_COLUMNS = ["step", "timestep", "step_size", "segregation", "retention", "total", "total_after", "grad_norm"]
EXAMPLES = [  # inside the toy models' vocabulary (TOY_EXAMPLES_LABEL); real models draw them too
    ["a red circle left of a blue square", "circle, square"],
    ["a green star above a yellow diamond", "star, diamond"],
    ["a purple triangle, a white cross and a red circle", "triangle, cross, circle"],
]


def parse_concepts(text: str | None) -> list[str]:
    """``"cat, red car"`` -> ``["cat", "red car"]`` (commas or semicolons separate concepts; empty -> ``[]``)."""
    return [c.strip() for c in re.split(r"[,;]", text or "") if c.strip()]


def parse_token_indices(text: str | None) -> list[list[int]]:
    """``"2, 5+6"`` -> ``[[2], [5, 6]]``: concepts separated by commas, semicolons or spaces; ``+`` joins the tokens
    of one concept (a word the tokenizer splits). Empty -> ``[]``."""
    groups = []
    for item in re.split(r"[,;\s]+", (text or "").strip()):
        if not item:
            continue
        try:
            group = [int(part) for part in item.split("+")]
        except ValueError:
            group = []
        if not group or any(i < 1 for i in group):
            raise ValueError(
                f"`token_indices` must be token positions (1 = the first prompt token) separated by commas, with "
                f"'+' joining the tokens of one concept (e.g. '2, 5+6'); got {text!r}. Show tokens lists them."
            )
        groups.append(group)
    return groups


def concept_choice(concepts: str | None, token_indices: str | None) -> dict[str, Any]:
    """``{"token_indices": ...}`` when token positions are given (they win), else ``{"concepts": ...}``."""
    groups = parse_token_indices(token_indices)
    if groups:
        return {"token_indices": groups}
    words = parse_concepts(concepts)
    if not words:
        raise ValueError(
            "`concepts` is empty: type the prompt's words to keep apart (e.g. 'cat, dog'), pick them under "
            "Show tokens, or give `token_indices`."
        )
    return {"concepts": words}


def _count(request: dict[str, Any], name: str, high: int, meaning: str) -> int | None:
    """0 (or empty) -> ``None`` (``meaning``); else an integer in ``1..high``."""
    value = request[name]
    if value is None or value == 0:
        return None
    return number(name, value, 0, high, integer=True, note=f" (0: {meaning})")


def _binarize(text: Any) -> str | float:
    text = str(text if text is not None else "").strip().lower()
    if text == "otsu":
        return "otsu"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise ValueError(f"`binarize` must be 'otsu' or a fraction of the max in (0, 1], got binarize={text!r}.")
    return value


def astar_options(request: dict[str, Any], config: UIConfig) -> dict[str, Any]:
    """The A-STAR keyword arguments of a request, checked (errors name the field)."""
    return {
        "segregation_weight": number("segregation_weight", request["segregation_weight"], 0, 100),
        "retention_weight": number("retention_weight", request["retention_weight"], 0, 100),
        "scale_factor": number("scale_factor", request["scale_factor"], 0, 1000),
        "max_steps_to_alter": _count(request, "max_steps_to_alter", config.max_steps, "every step, as the paper"),
        "binarize": _binarize(request["binarize"]),
        "attn_res": _count(request, "attn_res", config.max_resolution // 8, "automatic"),
        "token_normalization": request["token_normalization"],
        "smooth_attentions": bool(request["smooth_attentions"]),
        "sigma": number("sigma", request["sigma"], 1e-3, 10),
    }


def _tokenizer(pipe):
    return getattr(pipe, "tokenizer", None) or pipe.tokenizer_2


def build_astar_tab(runtime: Runtime) -> None:
    import gradio as gr
    import torch

    from ..io import save_image
    from ..pipelines._astar_maps import TOKEN_NORMALIZATIONS, render_attention_maps
    from ..pipelines.astar import astar_parameters, astar_pipeline_for, prompt_tokens
    from ..pipelines.loading import pipeline_defaults

    config = runtime.config
    default = "tiny-sd15" if "tiny-sd15" in config.models else config.default_model
    with gr.Tab("A-STAR", id="astar"):
        gr.Markdown(
            "Keep several concepts apart and present ([A-STAR](https://arxiv.org/abs/2306.14544), SD 1.x/2.x and "
            "SDXL models): at every denoising step one gradient step on the latent lowers the overlap of the "
            "concepts' cross-attention maps (segregation) and keeps each map inside its previous region (retention). "
            "The result is shown next to the stock image at the same seed."
        )
        model = model_picker(config, value=default)
        prompt, run = prompt_row(placeholder="e.g. a cat and a dog")
        with gr.Row():
            concepts = gr.Textbox(
                label="Concepts",
                value="",
                placeholder="cat, dog",
                info="words of the prompt to keep apart, separated by commas",
                scale=3,
            )
            token_indices = gr.Textbox(
                label="Token indices",
                value="",
                placeholder="2, 5+6",
                info="instead of words: token positions ('+' joins one concept's tokens)",
                scale=2,
            )
            show_tokens = gr.Button("Show tokens", variant="secondary", scale=1, min_width=120)
        with gr.Accordion("Prompt tokens", open=False) as tokens_box:
            words = gr.CheckboxGroup(choices=[], value=[], label="Pick concepts from the prompt's words")
            tokens = gr.Dataframe(
                headers=["position", "token", "word"],
                datatype=["number", "str", "str"],
                interactive=False,
                label="Tokens (position = what Token indices takes)",
            )
        with gr.Row():
            result = gr.Image(label="A-STAR", type="filepath", format="png", interactive=False, height=360)
            stock = gr.Image(
                label="Stock (same seed, no A-STAR)", type="filepath", format="png", interactive=False, height=360
            )
        maps = gr.Image(label="Cross-attention maps per concept and step", type="filepath", interactive=False)
        with gr.Accordion("Losses per step", open=False):
            losses = gr.Dataframe(headers=LOSS_COLUMNS, interactive=False, label="Losses (means over the batch)")
        with advanced_settings(config, frames=False) as advanced:
            gr.Markdown("A-STAR settings: the paper's values where it gives them (weights 1 and 1, every step).")
            with gr.Row():
                segregation_weight = gr.Number(value=1.0, label="Segregation weight", info="Eq. 2; paper: 1")
                retention_weight = gr.Number(value=1.0, label="Retention weight", info="Eq. 3; paper: 1")
                scale_factor = gr.Number(
                    value=20.0, label="Step size scale", info="alpha_t = scale * sqrt(linspace(1, 0.5)); A&E: 20"
                )
                max_steps_to_alter = gr.Number(value=0, label="Steps to alter", info="0: every step (paper)")
            with gr.Row():
                binarize = gr.Textbox(
                    value="otsu", label="Retention masks", info="'otsu' or a fraction of the max, e.g. 0.5"
                )
                attn_res = gr.Number(value=0, label="Map grid", info="0: automatic (16 for SD at 512 px)")
                token_normalization = gr.Dropdown(
                    list(TOKEN_NORMALIZATIONS), value="sum", label="Token normalisation", info="over the text tokens"
                )
            with gr.Row():
                smooth_attentions = gr.Checkbox(value=True, label="Gaussian smoothing (3x3)")
                sigma = gr.Number(value=0.5, label="Sigma", info="smoothing sigma; 0.5")
                compare = gr.Checkbox(value=True, label="Also make the stock image")
                contrast = gr.Radio(
                    list(CONTRASTS), value="max", label="Map contrast", info="minmax: stretch nearly flat maps"
                )
        parameters = parameters_panel()
        gr.Examples(examples=EXAMPLES, inputs=[prompt, concepts], label=TOY_EXAMPLES_LABEL)

    @checked_request
    def astar_tokens(model: str, prompt: str, concepts: str | None = None):
        """The prompt's tokens as ``[position, token, word]`` rows (positions as Token indices takes them), and the
        prompt's words for the concept picker (the current concepts ticked)."""
        with user_errors("Tokenizing"):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError("`prompt` is empty; enter the prompt whose tokens to show.")
            with runtime.session(model) as pipe:
                astar_pipeline_for(pipe, model)  # an unsupported model is refused here already
                tokenizer = _tokenizer(pipe)
            rows = [list(row) for row in prompt_tokens(tokenizer, prompt)]
        choices = list(dict.fromkeys(w for _, _, w in rows if re.match(r"\w", w)))
        picked = [c for c in parse_concepts(concepts) if c in choices]
        return rows, gr.update(choices=choices, value=picked), gr.update(open=True)

    show_tokens.click(
        astar_tokens,
        inputs=[model, prompt, concepts],
        outputs=[tokens, words, tokens_box],
        api_name="astar_tokens",
        concurrency_limit=1,
        concurrency_id=config.queue_id,
    )
    words.input(lambda picked: ", ".join(picked), words, concepts, queue=False, api_visibility="private")

    def forget_tokens():
        """A new prompt has other tokens: empty the table and the word picker (old ticks would name absent words)."""
        return [], gr.update(choices=[], value=[])

    prompt.change(forget_tokens, None, [tokens, words], queue=False, api_visibility="private")

    def render(output, labels, contrast: str):
        return render_attention_maps(output.attention_maps[:, 0], labels, contrast=contrast)

    @checked_request
    def astar(progress=gr.Progress(track_tqdm=True), **request: Any):  # noqa: B008
        """Generate with A-STAR and, with ``compare``, the stock image at the same seed. Returns the A-STAR image, the
        stock image (or ``None``), the attention-map figure (rows: concepts, columns: steps; A-STAR above stock), the
        losses per step, the seed used and the parameters (PNGs with parameters embedded)."""
        with user_errors("A-STAR"):
            settings = request_settings(config, request["prompt"], **{n: request[n] for n in SETTING_INPUTS})
            choice = concept_choice(request["concepts"], request["token_indices"])
            options = astar_options(request, config)
            if request["contrast"] not in CONTRASTS:
                raise ValueError(f"`contrast` must be one of {', '.join(CONTRASTS)}, got {request['contrast']!r}.")
            with runtime.session(request["model"]) as pipe:
                astar = astar_pipeline_for(pipe, request["model"])
                # "the pipeline's default" is the model's own pipeline's (SDXL: guidance 5), as in the Generate tab
                defaults = pipeline_defaults(pipe)
                signature = inspect.signature(pipe.__call__).parameters
                for name in ("num_inference_steps", "guidance_scale"):
                    defaults.setdefault(name, signature[name].default)
                call = dict(
                    negative_prompt=settings.negative_prompt,
                    height=settings.height or defaults.get("height"),
                    width=settings.width or defaults.get("width"),
                    num_inference_steps=settings.steps or defaults["num_inference_steps"],
                    guidance_scale=defaults["guidance_scale"] if settings.guidance is None else settings.guidance,
                    output_type="pil",
                    return_attention_maps=True,
                )

                def run(**overrides):
                    generator = torch.Generator("cpu").manual_seed(settings.seed)
                    return astar(settings.prompt, generator=generator, **choice, **call, **{**options, **overrides})

                output = run()
                baseline = run(max_steps_to_alter=0) if request["compare"] else None
            base = dict(
                model=request["model"],
                prompt=settings.prompt,
                negative_prompt=settings.negative_prompt,
                seed=settings.seed,
                steps=call["num_inference_steps"],
                guidance=call["guidance_scale"],
                height=output.images[0].height,
                width=output.images[0].width,
            )
            parameters = astar_parameters(astar, output, {**choice, **options}, **base)
            figures = [render(output, output.concepts, request["contrast"])]
            items = [("astar", output.images[0], parameters)]
            if baseline is not None:
                figures.append(render(baseline, output.concepts, request["contrast"]))
                stock_options = {**choice, **options, "max_steps_to_alter": 0}
                items.append(("stock", baseline.images[0], astar_parameters(astar, baseline, stock_options, **base)))
            figure, _ = labelled_grid([[f] for f in figures], ["A-STAR", "stock"][: len(figures)], [""])
            items.append(("maps", figure, parameters))
            paths = {}
            for name, image, embedded in items:
                paths[name] = str(runtime.output_path(settings.seed, ".png"))
                save_image(image, paths[name], {**embedded, "image": name})
            table = [[record.get(c) for c in LOSS_COLUMNS] for record in output.losses]
        return paths["astar"], paths.get("stock"), paths["maps"], table, settings.seed, parameters

    gr.on(
        triggers=[run.click, prompt.submit],
        fn=astar,
        inputs_kwargs={
            "model": model,
            "prompt": prompt,
            "concepts": concepts,
            "token_indices": token_indices,
            **{k: v for k, v in advanced.named().items() if k != "num_frames"},
            "segregation_weight": segregation_weight,
            "retention_weight": retention_weight,
            "scale_factor": scale_factor,
            "max_steps_to_alter": max_steps_to_alter,
            "binarize": binarize,
            "attn_res": attn_res,
            "token_normalization": token_normalization,
            "smooth_attentions": smooth_attentions,
            "sigma": sigma,
            "compare": compare,
            "contrast": contrast,
        },
        outputs=[result, stock, maps, losses, advanced.seed, parameters],
        api_name="astar",
        concurrency_limit=1,
        concurrency_id=config.queue_id,
    )
