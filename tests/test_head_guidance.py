"""Head perturbation guidance on unmodified pipelines: diffusers PAG parity, the guidance formula, the modular guider."""

import numpy as np
import pytest
import torch
from head_reference import reference_perturbed_attention

from attnpack.attn_processors import apply_processors
from attnpack.attn_processors.head_perturbation import resolve_heads
from attnpack.pipelines.guidance import apply_head_perturbation
from attnpack.techniques import get_technique
from attnpack.toy.tiny import TINY_MODELS, build_tiny_denoiser, build_tiny_pipeline, denoiser_inputs


PROMPT = "a red cat"


def _run(pipe, name, steps=2, **kwargs):
    kw = {**TINY_MODELS[name][2], **kwargs}
    out = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np", **kw)
    return out.images if hasattr(out, "images") else out.frames


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes, name):
    if name not in pipes:
        pipes[name] = build_tiny_pipeline(name)
    return pipes[name]


# ------------------------------------------------------------------------------------------------- diffusers PAG
PAG_CASES = [
    # tiny model, diffusers PAG pipeline, pag_applied_layers, attnpack heads (all heads of those layers), g, adaptive
    # and token scope: UNet self-attention has no text, where both scopes are PAG's identity
    ("tiny-sd15", "StableDiffusionPAGPipeline", ["mid"], ["L3"], 5.0, 0.0, "image"),
    ("tiny-sd15", "StableDiffusionPAGPipeline", ["mid"], ["L3"], 1.0, 0.0, "full"),  # without CFG
    ("tiny-sdxl", "StableDiffusionXLPAGPipeline", ["down_blocks.1"], ["L0", "L1"], 5.0, 0.002, "full"),
    ("tiny-sd3", "StableDiffusion3PAGPipeline", [r"transformer_blocks\.1\.attn$"], ["L1"], 5.0, 0.0, "image"),
    ("tiny-sd3", "StableDiffusion3PAGPipeline", [r"transformer_blocks\.0\.attn$"], ["L0"], 1.0, 0.002, "image"),
]


@pytest.mark.parametrize("name, pag_cls, pag_layers, heads, guidance_scale, adaptive, scope", PAG_CASES)
def test_reproduces_diffusers_pag_pipelines(pipes, name, pag_cls, pag_layers, heads, guidance_scale, adaptive, scope):
    import diffusers

    pipe = _pipe(pipes, name)
    pag = getattr(diffusers, pag_cls).from_pipe(pipe, pag_applied_layers=pag_layers)
    pag.set_progress_bar_config(disable=True)
    kw = dict(guidance_scale=guidance_scale)
    ref = _run(pag, name, pag_scale=2.0, pag_adaptive_scale=adaptive, **kw)
    with apply_head_perturbation(pipe, heads, scale=2.0, token_scope=scope, adaptive_scale=adaptive):
        ours = _run(pipe, name, **kw)
    base = _run(pipe, name, **kw)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    assert np.abs(ours - base).max() > 1e-3  # PAG changed the image, so the comparison means something


@pytest.mark.parametrize(
    "name, base_cls, pag_cls, pag_layers, heads",
    [
        ("tiny-sd15", "StableDiffusionImg2ImgPipeline", "StableDiffusionPAGImg2ImgPipeline", ["mid"], "L3"),
        (
            "tiny-sd3",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3PAGImg2ImgPipeline",
            [r"transformer_blocks\.1\.attn$"],
            "L1",
        ),
    ],
)
def test_reproduces_diffusers_pag_img2img(pipes, name, base_cls, pag_cls, pag_layers, heads):
    """img2img starts mid-schedule: the adaptive scale must use the timesteps actually run."""
    import diffusers
    from PIL import Image

    pipe = getattr(diffusers, base_cls).from_pipe(_pipe(pipes, name))
    pag = getattr(diffusers, pag_cls).from_pipe(pipe, pag_applied_layers=pag_layers)
    for p in (pipe, pag):
        p.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    kw = dict(image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0, output_type="np")
    kw.update({k: v for k, v in TINY_MODELS[name][2].items() if k == "max_sequence_length"})
    ref = pag(PROMPT, generator=torch.Generator().manual_seed(0), pag_scale=2.0, pag_adaptive_scale=0.001, **kw)
    with apply_head_perturbation(pipe, heads, scale=2.0, token_scope="image", adaptive_scale=0.001):
        ours = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw)
    np.testing.assert_allclose(ours.images, ref.images, atol=2e-5, rtol=0)


def test_sd3_full_scope_differs_from_diffusers_pag(pipes):
    """HeadHunter's full-sequence identity is not diffusers' image-only mask on joint attention."""
    pipe = _pipe(pipes, "tiny-sd3")
    with apply_head_perturbation(pipe, "L0", scale=2.0, token_scope="image"):
        image = _run(pipe, "tiny-sd3")
    with apply_head_perturbation(pipe, "L0", scale=2.0, token_scope="full"):
        full = _run(pipe, "tiny-sd3")
    assert np.abs(image - full).max() > 1e-4


# ------------------------------------------------------------------------------------------------- neutral settings
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-wan"])
def test_scale_zero_reproduces_the_pipeline_exactly(pipes, name):
    pipe = _pipe(pipes, name)
    base = _run(pipe, name)
    with apply_head_perturbation(pipe, "L1H0,L0", scale=0.0):
        np.testing.assert_array_equal(_run(pipe, name), base)


# ------------------------------------------------------------------------------------------------- the formula
class _ExplicitCore:
    def __init__(self, heads, u):
        self.heads, self.u = heads, u

    def __call__(self, q, k, v, call):
        out = call.dense(q, k, v).clone()
        out[:, self.heads] = reference_perturbed_attention(
            q[:, self.heads],
            k[:, self.heads],
            v[:, self.heads],
            image=call.layout.image,
            text=call.layout.text,
            u=self.u,
            kind="identity",
            scope="full",
        )
        return out


def _clone(x):
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _record(pipe, model, name, **kwargs):
    """Run ``pipe``; return the denoiser calls (args, kwargs) and the model outputs handed to scheduler.step."""
    calls, outputs = [], []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append((_clone(a), _clone(kw))), with_kwargs=True)
    step = pipe.scheduler.step
    own = "step" in vars(pipe.scheduler)  # the run context's step counter, while guidance is applied

    def recording_step(model_output, *a, **kw):
        outputs.append(model_output.clone())
        return step(model_output, *a, **kw)

    pipe.scheduler.step = recording_step
    try:
        _run(pipe, name, **kwargs)
    finally:
        hook.remove()
        if own:
            pipe.scheduler.step = step
        else:
            del pipe.scheduler.step
    return calls, outputs


def _predict(model, call, rows=None):
    args, kwargs = call
    kwargs = {**kwargs, "return_dict": False}
    if rows is not None:  # the conditional half of a batched [uncond, cond] call
        b = kwargs["hidden_states"].shape[0]
        kwargs = {k: (v[rows] if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v) for k, v in kwargs.items()}
    with torch.no_grad():
        return model(*args, **kwargs)[0]


@pytest.mark.parametrize(
    "name, kwargs, g, passes",
    [
        ("tiny-sd3", dict(guidance_scale=4.0), 4.0, "batched"),  # batch [uncond, cond]
        ("tiny-sd3", dict(guidance_scale=1.0), None, "single"),  # no CFG
        ("tiny-flux", dict(true_cfg_scale=3.0, negative_prompt="blue"), 3.0, "separate"),  # cache_context cond/uncond
        ("tiny-flux", dict(), None, "single"),  # FLUX.1-dev style: distilled guidance only
        ("tiny-wan", dict(guidance_scale=4.0), 4.0, "separate"),
    ],
)
@pytest.mark.parametrize("separate_pass", [False, True])
def test_guidance_formula(pipes, name, kwargs, g, passes, separate_pass):
    """eps = eps_u + g (eps_c - eps_u) + s (eps_c - eps_ptb), or eps_c + s (eps_c - eps_ptb) without CFG, with the
    perturbed prediction computed independently (explicit attention matrices on the conditional inputs)."""
    pipe = _pipe(pipes, name)
    model = pipe.transformer
    s, u, heads = 2.5, 0.6, "L1H1,L0H0"
    with apply_head_perturbation(pipe, heads, scale=s, softness=u, separate_pass=separate_pass):
        calls, outputs = _record(pipe, model, name, **kwargs)
    resolved = resolve_heads(model, heads)
    per_step = {"batched": 1, "single": 1, "separate": 2}[passes]
    assert len(calls) == per_step * len(outputs) == per_step * 2
    for step, eps in enumerate(outputs):
        step_calls = calls[per_step * step : per_step * (step + 1)]
        if passes == "batched":
            n = step_calls[0][1]["hidden_states"].shape[0] // 2
            eps_u, eps_c = _predict(model, step_calls[0]).chunk(2)
            cond = (step_calls[0], slice(n, None))
        else:
            eps_c = _predict(model, step_calls[0])
            eps_u = _predict(model, step_calls[1]) if passes == "separate" else None
            cond = (step_calls[0], None)
        with apply_processors(
            model, lambda info: _ExplicitCore(resolved[info.name], u) if info.name in resolved else None
        ):
            eps_ptb = _predict(model, *cond)
        expected = eps_c + s * (eps_c - eps_ptb)
        if g is not None:
            expected = eps_u + g * (eps_c - eps_u) + s * (eps_c - eps_ptb)
        torch.testing.assert_close(eps, expected, atol=2e-5, rtol=1e-5)


def test_window_and_adaptive_scale(pipes):
    pipe = _pipe(pipes, "tiny-sd3")
    model = pipe.transformer
    _, base = _record(pipe, model, "tiny-sd3", steps=4, guidance_scale=1.0)
    with apply_head_perturbation(pipe, "L0", scale=2.0, start=0.25, end=0.75):
        _, windowed = _record(pipe, model, "tiny-sd3", steps=4, guidance_scale=1.0)
    changed = [bool((a - b).abs().max() > 1e-6) for a, b in zip(windowed, base)]
    assert changed == [False, True, True, True]  # step 0 is identical; later steps follow different latents
    assert torch.equal(windowed[0], base[0])
    # adaptive scale s - a (1000 - t): with a = 1 only the first step (t = 1000) keeps s = 2, later ones drop to 0
    assert float(pipe.scheduler.timesteps[0]) == 1000.0
    with apply_head_perturbation(pipe, "L0", scale=2.0, adaptive_scale=1.0):
        _, adaptive = _record(pipe, model, "tiny-sd3", steps=4, guidance_scale=1.0)
    with apply_head_perturbation(pipe, "L0", scale=2.0, end=0.25):
        _, first_only = _record(pipe, model, "tiny-sd3", steps=4, guidance_scale=1.0)
    assert all(torch.equal(a, b) for a, b in zip(adaptive, first_only))
    assert not torch.equal(adaptive[0], base[0])


@pytest.mark.parametrize("name", ["sd3", "unet-sd15", "flux"])
def test_bare_denoiser_and_return_dict(name):
    """On a bare denoiser every call is conditional: out = eps + s (eps - eps_ptb), for both output types."""
    model = build_tiny_denoiser(name)
    inputs = denoiser_inputs(model, batch_size=2)
    with torch.no_grad():
        eps = model(**inputs, return_dict=False)[0]
        with apply_processors(
            model, lambda i: _ExplicitCore([0], 1.0) if i.name in resolve_heads(model, "L1H0") else None
        ):
            eps_ptb = model(**inputs, return_dict=False)[0]
        with apply_head_perturbation(model, "L1H0", scale=3.0):
            as_tuple = model(**inputs, return_dict=False)
            as_output = model(**inputs, return_dict=True)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], eps + 3.0 * (eps - eps_ptb), atol=2e-5, rtol=0)
    torch.testing.assert_close(as_output.sample, as_tuple[0], atol=0, rtol=0)


def test_handle_restores_and_errors(pipes):
    pipe = _pipe(pipes, "tiny-sd3")
    model = pipe.transformer
    before = dict(model.attn_processors)
    forward_before = model.forward
    handle = apply_head_perturbation(pipe, "L1H2")
    assert handle.heads == ["L1H2"] and list(handle.processors) == ["transformer_blocks.1.attn.processor"]
    with pytest.raises(ValueError, match="already applied"):
        apply_head_perturbation(pipe, "L0H0")
    handle.remove()
    handle.remove()  # idempotent
    assert dict(model.attn_processors) == before
    assert "step" not in vars(pipe.scheduler)  # the step counter is gone
    assert model._diffusers_hook.hooks == {}  # guidance and run-context hooks are gone
    assert model.forward.__name__ == forward_before.__name__
    for kwargs, message in [
        (dict(scale=-1.0), "`scale` must be a number in"),
        (dict(softness=1.5), "`softness` must be a number in"),
        (dict(kind="blur"), "`kind` must be one of"),
        (dict(token_scope="text"), "`token_scope` must be one of"),
        (dict(start=0.6, end=0.5), "`start` must be smaller"),
        (dict(heads="L9H0"), "perturbable layers"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_head_perturbation(pipe, **{"heads": "L0H0", **kwargs})
    assert dict(model.attn_processors) == before  # failed calls leave nothing behind
    with pytest.raises(ValueError, match="pass the pipeline"):
        apply_head_perturbation(model, "L0H0", start=0.5)


def test_technique_registry_matches_the_api():
    import inspect

    tech = get_technique("head-guidance")
    params = inspect.signature(apply_head_perturbation).parameters
    assert [o.name for o in tech.options] == [p for p in params if p != "pipe"]
    for opt in tech.options:
        if params[opt.name].default is not inspect.Parameter.empty:
            assert opt.default == params[opt.name].default, opt.name


def test_cli_generate_with_head_guidance(tmp_path):
    from attnpack import read_parameters
    from attnpack.cli import main

    out = tmp_path / "x.png"
    code = main(
        [
            "generate",
            "-m",
            "tiny-sd3",
            "-p",
            PROMPT,
            "--steps",
            "2",
            "-t",
            "head-guidance",
            "--opt",
            "heads=L1H0,L0H3",
            "--opt",
            "softness=0.5",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    assert read_parameters(out)["techniques"] == [
        {"name": "head-guidance", "heads": ["L1H0", "L0H3"], "softness": 0.5}
    ]
    assert main(["generate", "-m", "tiny-sd3", "-p", PROMPT, "-t", "head-guidance", "--opt", "heads=L7H0"]) == 2


# ------------------------------------------------------------------------------------------------- modular guider
def _modular(pipe, blocks):
    import diffusers.modular_pipelines as mp

    modular = getattr(mp, blocks)().init_pipeline()
    modular.update_components(**{k: v for k, v in pipe.components.items() if v is not None})
    modular.set_progress_bar_config(disable=True)
    return modular


def _run_modular(modular, guider, steps=2, **kwargs):
    modular.update_components(guider=guider)
    out = modular(
        prompt=PROMPT,
        negative_prompt="",
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output="images",
        height=64,
        width=64,
        output_type="np",
        **kwargs,
    )
    return np.asarray(out)


def test_guider_on_modular_sd3_matches_the_pipeline_hook(pipes, tmp_path):
    from attnpack import HeadPerturbationGuidance

    pipe = _pipe(pipes, "tiny-sd3")
    modular = _modular(pipe, "StableDiffusion3AutoBlocks")
    guider = HeadPerturbationGuidance(
        heads=["L1H2", "L0"], guidance_scale=5.0, perturbed_guidance_scale=2.0, softness=0.5
    )
    ours = _run_modular(modular, guider, max_sequence_length=32)
    before = dict(pipe.transformer.attn_processors)
    with apply_head_perturbation(pipe, ["L1H2", "L0"], scale=2.0, softness=0.5):
        ref = _run(pipe, "tiny-sd3", negative_prompt="", guidance_scale=5.0)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    assert dict(pipe.transformer.attn_processors) == before  # the guider removed its processors
    guider.save_pretrained(tmp_path)
    loaded = HeadPerturbationGuidance.from_pretrained(tmp_path)
    assert loaded.heads == ["L1H2", "L0"] and loaded.softness == 0.5 and loaded.perturbed_guidance_scale == 2.0
    assert HeadPerturbationGuidance(heads=[(1, 2), 0, "sd3-medium/blue"]).config.heads == ["L1H2", "L0", "L0H23"]


def test_guider_on_modular_sdxl_matches_diffusers_pag_guider(pipes):
    """UNet self-attention, all heads, identity: diffusers' PerturbedAttentionGuidance (which skips the first step
    even with start 0: its window test is `start < step`) equals ours with the window starting at step 1."""
    from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance
    from diffusers.hooks import LayerSkipConfig

    from attnpack import HeadPerturbationGuidance

    modular = _modular(_pipe(pipes, "tiny-sdxl"), "StableDiffusionXLAutoBlocks")
    config = LayerSkipConfig(
        indices=[0],
        fqn="mid_block.attentions.0.transformer_blocks",
        skip_attention=False,
        skip_attention_scores=True,
        skip_ff=False,
    )
    common = dict(guidance_scale=5.0, perturbed_guidance_scale=2.0, perturbed_guidance_stop=1.0)
    theirs = _run_modular(
        modular,
        PerturbedAttentionGuidance(perturbed_guidance_start=0.0, perturbed_guidance_config=config, **common),
        4,
    )
    ours = _run_modular(modular, HeadPerturbationGuidance(heads="L6", perturbed_guidance_start=0.25, **common), 4)
    cfg = _run_modular(modular, ClassifierFreeGuidance(guidance_scale=5.0), 4)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert np.abs(ours - cfg).max() > 1e-3


def test_uncond_pass_needs_the_cond_pass_first():
    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model)
    with apply_head_perturbation(model, "L0H0"), torch.no_grad():
        with model.cache_context("cond"):
            cond = model(**inputs, return_dict=False)[0]
        with model.cache_context("uncond"):  # gets the same shift as the cond pass before it
            uncond = model(**inputs, return_dict=False)[0]
        torch.testing.assert_close(uncond, cond, atol=1e-6, rtol=0)
        with (
            pytest.raises(RuntimeError, match="without the conditional pass before it"),
            model.cache_context("uncond"),
        ):
            model(**inputs, return_dict=False)


def test_builtin_model_has_default_heads():
    """Issue 21: head guidance runs with its defaults on the default model (toy-flux ships heads found by the head
    search, preset toy-flux/searched); other models need heads, and the error says how to get some."""
    import numpy as np

    from attnpack.pipelines import load_pipeline
    from attnpack.presets import default_preset, get_preset

    pipe = load_pipeline("toy-flux", device="cpu")
    assert default_preset("toy-flux") == "toy-flux/searched" and get_preset("toy-flux/searched").heads

    def run(**kwargs):
        gen = torch.Generator("cpu").manual_seed(0)
        call = dict(num_inference_steps=3, max_sequence_length=24, generator=gen, output_type="np")
        if kwargs:
            with apply_head_perturbation(pipe, **kwargs) as handle:
                return pipe("a red circle", **call).images[0], handle.heads
        return pipe("a red circle", **call).images[0], []

    default, heads = run(scale=3.0)
    explicit, _ = run(heads="toy-flux/searched", scale=3.0)
    stock, _ = run()
    np.testing.assert_array_equal(default, explicit)
    assert sorted(heads) == sorted(get_preset("toy-flux/searched").spec) and np.abs(default - stock).max() > 1e-3
    with pytest.raises(ValueError, match="`heads` is required for this model"):
        apply_head_perturbation(build_tiny_pipeline("tiny-sd3"))
