"""The A-STAR tab through its API endpoints (gradio_client) on the tiny SD 1.5 and SDXL models.

References are made without the UI: ``AStarPipeline`` / ``AStarXLPipeline`` called directly on a freshly built tiny
pipeline with the same seed (the A-STAR image, its maps and losses), the stock diffusers pipeline called directly
(the stock image), and the tokenizer called directly (the token table).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ui_support import STEPS, launched, need, pixels, reference_image, ui_techniques

from attnpack import read_parameters


need("gradio", "pip install attnpack[ui]")
gradio_client = need("gradio_client", "pip install attnpack[test]")

from attnpack.ui import build_demo  # noqa: E402
from attnpack.ui._runtime import default_loader  # noqa: E402


PROMPT = "a cat and a zebra"  # the tiny tokenizer: cat = token 2; zebra is split, tokens 5..8
GUIDANCE = {"tiny-sd15": 7.5, "tiny-sdxl": 5.0}  # diffusers' defaults for SD and SDXL, which the UI's -1 means
_DIRECT: dict = {}


@pytest.fixture(scope="module")
def client():
    demo = build_demo(
        default_loader(device="cpu"),
        device="cpu",
        allow_hub=False,
        max_resolution=256,
        max_steps=8,
        max_cached_models=2,
        techniques=ui_techniques(),
    )
    with launched(demo) as url:
        yield gradio_client.Client(url, verbose=False)


def direct(model: str, seed: int, **kwargs):
    """A-STAR called directly (no UI): the tiny model's pipeline, 64 x 64, CPU generator with ``seed``."""
    from attnpack import AStarPipeline, AStarXLPipeline
    from attnpack.toy.tiny import build_tiny_pipeline

    if model not in _DIRECT:
        cls = AStarXLPipeline if model == "tiny-sdxl" else AStarPipeline
        _DIRECT[model] = cls.from_pipe(build_tiny_pipeline(model))
    return _DIRECT[model](
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE[model],
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        return_attention_maps=True,
        **kwargs,
    )


def astar(client, **kwargs):
    args = dict(model="tiny-sd15", prompt=PROMPT, concepts="cat, zebra", steps=STEPS, seed=3, randomize_seed=False)
    return client.predict(**{**args, **kwargs}, api_name="/astar")


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_astar_equals_the_pipeline_next_to_the_stock_image(client, model):
    image, stock, maps, losses, seed, params = astar(client, model=model)
    expected = direct(model, 3, concepts=["cat", "zebra"])
    np.testing.assert_array_equal(pixels(image), np.asarray(expected.images[0].convert("RGB")))
    # the stock image is what the plain diffusers pipeline makes at that seed, and A-STAR changed it
    np.testing.assert_array_equal(pixels(stock), reference_image(model, PROMPT, 3))
    assert not np.array_equal(pixels(image), pixels(stock))
    assert seed == 3 and params["seed"] == 3 and params["steps"] == STEPS and params["guidance"] == GUIDANCE[model]
    assert params["concepts"] == ["cat", "zebra"] and params["token_indices"] == [[2], [5, 6, 7, 8]]
    assert params["astar"]["segregation_weight"] == 1.0 and params["astar"]["retention_weight"] == 1.0
    assert params["astar"]["max_steps_to_alter"] is None and params["astar"]["binarize"] == "otsu"
    assert read_parameters(image) == {**params, "image": "astar"}
    assert read_parameters(stock)["image"] == "stock" and read_parameters(stock)["astar"]["max_steps_to_alter"] == 0
    # per-step losses as the pipeline reports them
    columns = losses["headers"]
    assert [row[0] for row in losses["data"]] == list(range(STEPS))
    for row, record in zip(losses["data"], expected.losses):
        for name in ("segregation", "retention", "total", "total_after"):
            assert row[columns.index(name)] == pytest.approx(record[name], rel=1e-5, abs=1e-7)
    # the maps picture: A-STAR's maps of the direct call on top (one row per concept), the stock maps below
    from attnpack.pipelines._astar_maps import render_attention_maps

    top = np.asarray(render_attention_maps(expected.attention_maps[:, 0], ["cat", "zebra"]).convert("RGB"))
    figure = pixels(maps)
    assert figure.shape[0] > 2 * top.shape[0]  # two grids: A-STAR and stock
    assert any(
        np.array_equal(figure[y : y + top.shape[0], x : x + top.shape[1]], top)
        for y in range(0, 40)
        for x in range(0, 80)
    )
    assert read_parameters(maps)["image"] == "maps"


def test_token_indices_and_loss_settings_reach_the_pipeline(client):
    settings = dict(binarize="0.5", scale_factor=10.0, max_steps_to_alter=1, attn_res=8, retention_weight=2.0)
    image, stock, _, losses, _, params = astar(client, token_indices="2+3, 5+6+7+8", compare=False, **settings)
    expected = direct(
        "tiny-sd15",
        3,
        token_indices=[[2, 3], [5, 6, 7, 8]],
        binarize=0.5,
        scale_factor=10.0,
        max_steps_to_alter=1,
        attn_res=8,
        retention_weight=2.0,
    )
    np.testing.assert_array_equal(pixels(image), np.asarray(expected.images[0].convert("RGB")))
    assert not np.array_equal(pixels(image), np.asarray(direct("tiny-sd15", 3, concepts=["cat", "zebra"]).images[0]))
    assert stock is None
    assert params["astar"]["binarize"] == 0.5 and params["astar"]["max_steps_to_alter"] == 1
    assert params["concepts"] == ["tokens [2, 3]", "tokens [5, 6, 7, 8]"]
    step_size = losses["headers"].index("step_size")
    assert losses["data"][0][step_size] == pytest.approx(10.0) and losses["data"][1][step_size] is None


def test_show_tokens_lists_the_positions_token_indices_takes(client):
    from attnpack.toy.tiny import build_tiny_pipeline

    table, words = client.predict(model="tiny-sd15", prompt=PROMPT, concepts="zebra", api_name="/astar_tokens")
    tokenizer = build_tiny_pipeline("tiny-sd15").tokenizer
    ids = tokenizer(PROMPT).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)[1:-1]  # without the start and end tokens
    assert [row[0] for row in table["data"]] == list(range(1, len(ids) - 1))
    assert [row[1] for row in table["data"]] == pieces
    assert [row[2] for row in table["data"]] == ["a", "cat", "and", "a", "zebra", "zebra", "zebra", "zebra"]
    assert [c[0] for c in words["choices"]] == ["a", "cat", "and", "zebra"] and words["value"] == ["zebra"]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(model="tiny-flux"), "A-STAR runs on Stable Diffusion 1.x/2.x and SDXL pipelines"),
        (dict(concepts=" , "), "`concepts` is empty"),
        (dict(concepts="horse"), "concept 'horse' does not occur in the prompt"),
        (dict(token_indices="2, x"), "`token_indices` must be token positions"),
        (dict(token_indices="0"), "`token_indices` must be token positions"),
        (dict(token_indices="40"), "`token_indices` [40] out of range"),
        (dict(binarize="2"), "`binarize` must be 'otsu' or a fraction of the max in (0, 1], got binarize='2'"),
        (dict(segregation_weight=-1.0), "`segregation_weight` must be a number in 0..100"),
        (dict(sigma=0.0), "`sigma` must be a number in 0.001..10"),
        (dict(max_steps_to_alter=-1), "`max_steps_to_alter` must be an integer in 0..8 (0: every step"),
        (dict(attn_res=-2), "`attn_res` must be an integer in 0..32 (0: automatic)"),
        (dict(attn_res=16), "available grids"),
        (dict(max_steps_to_alter=9), "`max_steps_to_alter` must be an integer in 0..8 (0: every step"),
        (dict(attn_res=1.5), "`attn_res` must be an integer in 0..32 (0: automatic), got attn_res=1.5"),
        (dict(steps=9), "`steps` must be an integer in 1..8 in this UI"),
        (dict(width=60), "`width` must be a multiple of 8"),
        (dict(prompt=" "), "`prompt` is empty"),
    ],
)
def test_invalid_requests_give_readable_errors(client, kwargs, expected):
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        astar(client, **kwargs)
    assert expected in str(info.value)


def test_show_tokens_refuses_unsupported_models(client):
    with pytest.raises(gradio_client.exceptions.AppError, match="A-STAR runs on Stable Diffusion"):
        client.predict(model="tiny-flux", prompt=PROMPT, api_name="/astar_tokens")
