"""IR-Diffusion attention cores against an explicit-score oracle written after the official processor.

The oracle (``official_*`` below) follows ``DreamStoryScaledAttnProcessor``: it relocates reference *hidden states*
with ``F.interpolate(mode="nearest")`` on the bounding-box crops, projects them with ``to_k`` / ``to_v``, builds the
full ``[N, (n + 1) N]`` score matrix with ``finfo.min`` biases (outer products for isolation) and applies softmax.
Our cores get the already projected ``q``, ``k``, ``v`` and use SDPA with boolean masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import RecordingCore

from attnpack import apply_processors
from attnpack.attn_processors import AttnPackProcessor, DenseCore, LayerInfo, RunState, TokenLayout
from attnpack.attn_processors.ir_diffusion import (
    STATE_KEY,
    IRAttnState,
    IsolationRepositionCore,
    MaskedMutualCrossCore,
    default_ir_layers,
    reposition_index,
    reposition_tokens,
)
from attnpack.attn_processors.processor import AttentionCall


HEADS, HEAD_DIM = 2, 8
MIN = torch.finfo(torch.float32).min


class FixedMasks:
    """Mask provider with fixed ``bool [n, N]`` masks at one grid."""

    def __init__(self, reference, target):
        self.reference, self.target = reference, target

    @property
    def num_subjects(self):
        return self.reference.shape[0]

    def at(self, grid):
        return self.reference, self.target


def rect(grid, y0, y1, x0, x1):
    m = torch.zeros(grid, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def blob(grid, y0, y1, x0, x1, seed):
    """A rectangle with some random holes (so bounding boxes and masks differ)."""
    g = torch.Generator().manual_seed(seed)
    m = rect(grid, y0, y1, x0, x1) & (torch.rand(grid, generator=g) > 0.25)
    m[y0, x0] = m[y1 - 1, x1 - 1] = True  # keep the bounding box
    return m


def make_call(grid, roles, state, *, kind="self", step=0, num_steps=4, num_keys=None, name=None):
    n_tok = grid[0] * grid[1]
    info = LayerInfo(
        name=name or f"up_blocks.0.attentions.0.transformer_blocks.0.{'attn1' if kind == 'self' else 'attn2'}",
        index=0,
        family="unet",
        kind=kind,
        kind_index=0,
        heads=HEADS,
        head_dim=HEAD_DIM,
    )
    layout = (
        TokenLayout.self_attention(n_tok, grid)
        if kind == "self"
        else TokenLayout.cross_attention(n_tok, num_keys, grid)
    )
    extras = {} if state is None else {STATE_KEY: state}
    run = RunState(
        family="unet",
        grid=grid,
        step_index=step,
        num_steps=num_steps,
        batch_size=len(roles),
        roles=tuple(roles),
        extras=extras,
    )
    return AttentionCall(None, info, layout, None, run, AttnPackProcessor(DenseCore(), info))


def heads(x):  # [B, N, H*D] -> [B, H, N, D]
    return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


# ------------------------------------------------------------------------------------------------- official oracle
def official_relocate_hidden(x, ref_mask, tgt_mask, grid):
    """``rescale_hidden_states_sa`` for one reference: x [N, C] -> [N, C]."""
    h, w = grid
    if tgt_mask.sum() == 0:
        return x
    t_idx = torch.nonzero(tgt_mask.view(h, w), as_tuple=True)
    tt, tb, tl, tr = t_idx[0].min(), t_idx[0].max(), t_idx[1].min(), t_idx[1].max()
    r_idx = torch.nonzero(ref_mask.view(h, w), as_tuple=True)
    rt, rb, rl, rr = r_idx[0].min(), r_idx[0].max(), r_idx[1].min(), r_idx[1].max()
    c = x.shape[-1]
    img = x.T.reshape(1, c, h, w) * ref_mask.view(h, w).float()
    out = torch.zeros_like(img)
    out[:, :, tt : tb + 1, tl : tr + 1] = F.interpolate(
        img[:, :, rt : rb + 1, rl : rr + 1], (int(tb - tt + 1), int(tr - tl + 1)), mode="nearest"
    )
    return out.reshape(c, -1).T


def official_relocate_mask(src_mask, tgt_mask, grid):
    """``relocate_mask``: the relocated reference mask [N]."""
    h, w = grid
    if src_mask.sum() == 0 or tgt_mask.sum() == 0:
        return src_mask.float()
    s = src_mask.view(h, w).float()
    t = tgt_mask.view(h, w)
    s_idx, t_idx = torch.nonzero(s, as_tuple=True), torch.nonzero(t, as_tuple=True)
    st, sb, sl, sr = s_idx[0].min(), s_idx[0].max(), s_idx[1].min(), s_idx[1].max()
    tt, tb, tl, tr = t_idx[0].min(), t_idx[0].max(), t_idx[1].min(), t_idx[1].max()
    out = torch.zeros(h, w)
    out[tt : tb + 1, tl : tr + 1] = F.interpolate(
        s[st : sb + 1, sl : sr + 1][None, None], (int(tb - tt + 1), int(tr - tl + 1)), mode="nearest"
    )[0, 0]
    return (out > 0).float().flatten()


def official_isolation_bias(tgt, n):
    """Sum over ordered pairs i != j of masked_fill(M_i M_j^T != 0, min): [N, N]."""
    n_tok = tgt.shape[1]
    bias = torch.zeros(n_tok, n_tok)
    for i in range(n):
        for j in range(n):
            if i != j:
                outer = tgt[i].float()[:, None] @ tgt[j].float()[None, :]
                bias = bias + outer.masked_fill(outer != 0, MIN)
    return bias


def official_self_attention(x, proj, group, masks, keep, grid, *, isolation, reposition, extended, ref_bias=0.0):
    """Explicit-score target self-attention of one CFG group; returns (out [H, N, D], probs [H, N, K], key labels)."""
    ref, tgt = masks
    n = ref.shape[0]
    wq, wk, wv = proj
    refs, t = group
    q = heads(wq(x[t][None]))[0]
    kt, vt = heads(wk(x[t][None]))[0], heads(wv(x[t][None]))[0]
    scale = HEAD_DIM**-0.5
    own = q @ kt.transpose(-1, -2) * scale
    if isolation:
        own = own + official_isolation_bias(tgt, n)
    if not extended:
        probs = own.softmax(-1)
        return probs @ vt, probs, torch.full((own.shape[-1],), -1)
    scores, values, labels = [], [], []
    for j in range(n):
        qmask = tgt[j] & keep[j]
        if qmask.sum() == 0:
            qmask = tgt[j]
        if reposition:
            xr = official_relocate_hidden(x[refs[j]], ref[j], tgt[j], grid)
            kmask = official_relocate_mask(ref[j], tgt[j], grid)
        else:
            xr = x[refs[j]]
            kmask = (ref[j] & keep[j]).float()
            if kmask.sum() == 0:
                kmask = ref[j].float()
        kj, vj = heads(wk(xr[None]))[0], heads(wv(xr[None]))[0]
        s = q @ kj.transpose(-1, -2) * scale + ref_bias
        s = s + torch.where(kmask == 0, MIN, 0.0)[None, None, :]
        s = s + torch.where(qmask == 0, MIN, 0.0)[None, :, None]
        scores.append(s)
        values.append(vj)
        labels.append(torch.full((s.shape[-1],), j))
    scores.append(own)
    values.append(vt)
    labels.append(torch.full((own.shape[-1],), -1))
    probs = torch.cat(scores, -1).softmax(-1)
    return probs @ torch.cat(values, 1), probs, torch.cat(labels)


def scenario(seed=0, grid=(8, 10), n=2):
    g = torch.Generator().manual_seed(seed)
    if n == 2:
        tgt = torch.stack([blob(grid, 1, 7, 0, 4, seed), blob(grid, 2, 6, 5, 10, seed + 1)])
        ref = torch.stack([blob(grid, 2, 8, 3, 8, seed + 2), blob(grid, 0, 3, 1, 9, seed + 3)])
    else:
        tgt = torch.stack([rect(grid, 0, 3, 0, 4), rect(grid, 4, 8, 0, 3), rect(grid, 5, 8, 6, 10)])
        ref = torch.stack([blob(grid, 1, 7, 2, 9, seed), rect(grid, 3, 5, 4, 6), blob(grid, 0, 8, 0, 10, seed + 1)])
    masks = (ref.flatten(1), tgt.flatten(1))
    c = HEADS * HEAD_DIM
    proj = tuple(torch.nn.Linear(c, c, bias=True) for _ in range(3))
    for lin in proj:
        with torch.no_grad():
            lin.weight.copy_(torch.randn(c, c, generator=g) / c**0.5)
            lin.bias.copy_(torch.randn(c, generator=g) * 0.1)
    roles = (["reference"] * n + ["target"]) * 2
    x = torch.randn(len(roles), grid[0] * grid[1], c, generator=g)
    return x, proj, masks, roles


def run_self_core(x, proj, masks, roles, grid, *, extended, step=0, **options):
    state = IRAttnState(masks=FixedMasks(*masks), dropout_seed=3, **options)
    captured = {}
    state.observer = lambda kind, call, q, k, v, out, info: captured.update(info)
    q, k, v = (heads(p(x)) for p in proj)
    call = make_call(grid, roles, state, step=step)
    with torch.no_grad():
        out = IsolationRepositionCore(extended=extended)(q, k, v, call)
    keep = state.keep_mask(grid, step, torch.device("cpu"))
    return out, captured, keep, state


# ------------------------------------------------------------------------------------------------- reposition
@pytest.mark.parametrize("seed", range(6))
def test_reposition_tokens_match_official_interpolation(seed):
    g = torch.Generator().manual_seed(seed)
    grid = (9, 13)
    ys = sorted(torch.randperm(grid[0], generator=g)[:2].tolist())
    xs = sorted(torch.randperm(grid[1], generator=g)[:2].tolist())
    ref = blob(grid, ys[0], ys[1] + 1, xs[0], xs[1] + 1, seed)
    tgt = blob(grid, 1 + seed % 3, grid[0] - 1, seed % 4, grid[1] - seed % 3, seed + 7)
    x = torch.randn(3, grid[0] * grid[1], 5, generator=g)
    ours = reposition_tokens(x, ref, tgt)
    for b in range(3):
        assert torch.equal(ours[b], official_relocate_hidden(x[b], ref.flatten(), tgt.flatten(), grid))
    # zeros outside the target box, exactly
    box = torch.zeros(grid, dtype=torch.bool)
    t_idx = torch.nonzero(tgt, as_tuple=True)
    box[t_idx[0].min() : t_idx[0].max() + 1, t_idx[1].min() : t_idx[1].max() + 1] = True
    assert torch.count_nonzero(ours[:, ~box.flatten()]) == 0
    # the relocated mask is the official one
    index = reposition_index(ref, tgt)
    relocated = torch.zeros(index.shape, dtype=torch.bool)
    relocated[index >= 0] = ref.flatten()[index[index >= 0]]
    assert torch.equal(relocated.float(), official_relocate_mask(ref.flatten(), tgt.flatten(), grid))


def test_reposition_hand_example():
    """A 2x2 reference square moved and stretched (nearest) into a 2x4 box of a 4x6 grid."""
    grid = (4, 6)
    ref, tgt = rect(grid, 0, 2, 0, 2), rect(grid, 2, 4, 2, 6)
    x = torch.arange(24.0)[:, None]  # token i carries the value i
    out = reposition_tokens(x, ref, tgt).view(4, 6)
    expected = torch.zeros(4, 6)
    expected[2] = torch.tensor([0, 0, 0, 0, 1, 1])
    expected[3] = torch.tensor([0, 0, 6, 6, 7, 7])
    assert torch.equal(out, expected)


def test_reposition_empty_masks():
    grid = (4, 4)
    x = torch.randn(16, 3)
    empty = torch.zeros(grid, dtype=torch.bool)
    assert torch.equal(reposition_tokens(x, rect(grid, 0, 2, 0, 2), empty), x)  # official: unchanged
    assert torch.count_nonzero(reposition_tokens(x, empty, rect(grid, 0, 2, 0, 2))) == 0
    assert (reposition_index(empty, rect(grid, 0, 2, 0, 2)) == -1).all()


# ------------------------------------------------------------------------------------------------- self-attention
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(reposition=False),
        dict(isolation=False),
        dict(dropout=0.0),
        dict(reference_bias=1.5),
        dict(n=3),
    ],
    ids=["default", "no-reposition", "no-isolation", "no-dropout", "ref-bias", "three-subjects"],
)
@pytest.mark.parametrize("extended", [True, False], ids=["ir-layer", "other-layer"])
def test_self_core_matches_official_explicit_scores(options, extended):
    options = dict(options)
    n = options.pop("n", 2)
    grid = (8, 10)
    x, proj, masks, roles = scenario(seed=1, grid=grid, n=n)
    out, captured, keep, state = run_self_core(x, proj, masks, roles, grid, extended=extended, step=2, **options)
    q, k, v = (heads(p(x)) for p in proj)
    with torch.no_grad():
        for group_start in (0, n + 1):
            refs, t = list(range(group_start, group_start + n)), group_start + n
            expected, _, _ = official_self_attention(
                x,
                proj,
                (refs, t),
                masks,
                keep,
                grid,
                isolation=state.isolation,
                reposition=state.reposition,
                extended=extended,
                ref_bias=state.reference_bias,
            )
            torch.testing.assert_close(out[t], expected, atol=2e-5, rtol=0)
            for r in refs:  # references: plain attention
                plain = F.scaled_dot_product_attention(q[r : r + 1], k[r : r + 1], v[r : r + 1])[0]
                torch.testing.assert_close(out[r], plain, atol=1e-6, rtol=0)


def test_self_core_isolation_changes_the_result():
    """The parity test above can fail: without isolation the official output differs a lot."""
    grid = (8, 10)
    x, proj, masks, roles = scenario(seed=2, grid=grid)
    out, _, keep, _ = run_self_core(x, proj, masks, roles, grid, extended=True)
    with torch.no_grad():
        wrong, _, _ = official_self_attention(
            x, proj, ([0, 1], 2), masks, keep, grid, isolation=False, reposition=True, extended=True
        )
    assert (out[2] - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("n", [2, 3])
def test_captured_probabilities_route_subjects(n):
    """Probabilities of our SDPA call, recomputed from the captured keys and mask: subject-i queries put exactly zero
    mass on target subject-j tokens and on reference j != i; background queries on every reference."""
    grid = (8, 10)
    x, proj, masks, roles = scenario(seed=3, grid=grid, n=n)
    out, info, keep, state = run_self_core(x, proj, masks, roles, grid, extended=True)
    q = heads(proj[0](x))
    targets = info["targets"]
    mask = info["mask"][0, 0]
    with torch.no_grad():
        scores = q[targets] @ info["keys"].transpose(-1, -2) * HEAD_DIM**-0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # [G, H, N, K]
        torch.testing.assert_close(probs @ info["values"], out[targets], atol=2e-5, rtol=0)
    ref, tgt = masks
    key_subject, key_pos = info["key_subject"], info["key_position"]
    is_ref = key_subject >= 0
    owner = torch.full((tgt.shape[1],), -1)
    for i in range(n):
        owner[tgt[i]] = i
    key_owner = torch.where(is_ref, -2, owner[key_pos])  # target-block key -> its subject (or -1 background)
    for i in range(n):
        rows = probs[:, :, tgt[i]]
        for j in range(n):
            if j != i:
                assert torch.count_nonzero(rows[..., key_owner == j]) == 0
                assert torch.count_nonzero(rows[..., key_subject == j]) == 0
        # dropped queries see no reference; kept ones do see reference i
        kept = (tgt[i] & keep[i])[tgt[i]]
        assert torch.count_nonzero(rows[:, :, ~kept][..., is_ref]) == 0
        assert bool((rows[:, :, kept][..., key_subject == i].sum(-1) > 0).all())
    background = ~tgt.any(0)
    assert torch.count_nonzero(probs[:, :, background][..., is_ref]) == 0
    # reference keys sit exactly inside the target box of their subject
    for j in range(n):
        t_idx = torch.nonzero(tgt[j].view(grid), as_tuple=True)
        rows_, cols_ = key_pos[key_subject == j] // grid[1], key_pos[key_subject == j] % grid[1]
        assert bool((rows_ >= t_idx[0].min()).all() and (rows_ <= t_idx[0].max()).all())
        assert bool((cols_ >= t_idx[1].min()).all() and (cols_ <= t_idx[1].max()).all())
    # no N x N x batch score tensor: one mask shared by heads and CFG halves
    assert info["mask"].shape[:2] == (1, 1) and info["mask"].dtype == torch.bool


def test_no_state_is_dense_and_roles_are_checked():
    grid = (4, 4)
    q, k, v = torch.randn(3, 3, HEADS, 16, HEAD_DIM).unbind(0)
    call = make_call(grid, ["cond"] * 3, None)
    assert torch.equal(IsolationRepositionCore(True)(q, k, v, call), F.scaled_dot_product_attention(q, k, v))
    state = IRAttnState(masks=FixedMasks(torch.ones(2, 16, dtype=torch.bool), torch.ones(2, 16, dtype=torch.bool)))
    with pytest.raises(ValueError, match="groups of 2 'reference' rows"):
        IsolationRepositionCore(True)(q, k, v, make_call(grid, ["uncond", "cond", "cond"], state))
    with pytest.raises(ValueError, match="dropout"):
        IRAttnState(masks=None, dropout=1.0)
    with pytest.raises(ValueError, match="ir_steps"):
        IRAttnState(masks=None, ir_steps=(0.5, 0.2))


def test_dropout_resampled_per_step_and_seeded():
    grid = (32, 32)
    masks = FixedMasks(torch.ones(2, 1024, dtype=torch.bool), torch.ones(2, 1024, dtype=torch.bool))
    a = IRAttnState(masks=masks, dropout_seed=7)
    b = IRAttnState(masks=masks, dropout_seed=7)
    c = IRAttnState(masks=masks, dropout_seed=8)
    cpu = torch.device("cpu")
    k0, k1 = a.keep_mask(grid, 0, cpu), a.keep_mask(grid, 1, cpu)
    assert not torch.equal(k0, k1)  # resampled every step
    assert torch.equal(k0, b.keep_mask(grid, 0, cpu))  # seeded
    assert not torch.equal(k0, c.keep_mask(grid, 0, cpu))
    assert not torch.equal(k0[0], k0[1])  # independent per subject
    assert abs(k0.float().mean().item() - 0.5) < 0.03  # Bernoulli(1 - 0.5)
    assert bool(IRAttnState(masks=masks, dropout=0.0).keep_mask(grid, 3, cpu).all())


def test_all_dropped_query_mask_falls_back_to_the_full_mask():
    grid = (4, 4)
    x, proj, _, roles = scenario(seed=4)
    x = x[:, :16]
    tgt = torch.zeros(2, 16, dtype=torch.bool)
    tgt[0, 0] = tgt[1, 15] = True  # one token each: dropout can drop it entirely
    ref = torch.ones(2, 16, dtype=torch.bool)
    for step in range(8):
        out, info, keep, _ = run_self_core(x, proj, (ref, tgt), roles, grid, extended=True, step=step)
        mask = info["mask"][0, 0]
        for j, token in ((0, 0), (1, 15)):
            assert bool(mask[token][info["key_subject"] == j].all())


# ------------------------------------------------------------------------------------------------- cross-attention
def test_mutual_cross_attention_matches_official_blend_after_to_out():
    grid, text = (6, 7), 5
    g = torch.Generator().manual_seed(5)
    n_tok, c = grid[0] * grid[1], HEADS * HEAD_DIM
    tgt = torch.stack([rect(grid, 0, 3, 0, 4), rect(grid, 2, 6, 3, 7)]).flatten(1)  # overlapping on purpose
    masks = FixedMasks(torch.ones_like(tgt), tgt)
    roles = ["reference", "reference", "target"] * 2
    q = torch.randn(6, HEADS, n_tok, HEAD_DIM, generator=g)
    k = torch.randn(6, HEADS, text, HEAD_DIM, generator=g)
    v = torch.randn(6, HEADS, text, HEAD_DIM, generator=g)
    to_out = torch.nn.Linear(c, c)
    lam = 0.9
    state = IRAttnState(masks=masks, cross_attention_lambda=lam)
    call = make_call(grid, roles, state, kind="cross", num_keys=text)
    with torch.no_grad():
        ours = to_out(MaskedMutualCrossCore()(q, k, v, call).transpose(1, 2).reshape(6, n_tok, c))

        def attend(qq, kk, vv, query_mask=None):
            s = qq @ kk.transpose(-1, -2) * HEAD_DIM**-0.5
            if query_mask is not None:
                s = s + torch.where(query_mask == 0, MIN, 0.0)[None, :, None]
            return to_out((s.softmax(-1) @ vv).transpose(0, 1).reshape(n_tok, c))

        for t, refs in ((2, (0, 1)), (5, (3, 4))):
            vanilla = attend(q[t], k[t], v[t])
            weight = tgt.float()
            mutual = sum(attend(q[t], k[r], v[r], tgt[i].float()) * weight[i][:, None] for i, r in enumerate(refs))
            area = weight.sum(0)[:, None]
            mutual = mutual / (area + 1e-8)
            unmasked = (area == 0).float()
            expected = vanilla * unmasked + vanilla * (1 - unmasked) * (1 - lam) + mutual * (1 - unmasked) * lam
            torch.testing.assert_close(ours[t], expected, atol=2e-5, rtol=0)
            for r in refs:
                torch.testing.assert_close(ours[r], attend(q[r], k[r], v[r]), atol=2e-5, rtol=0)
        # background rows of the target are untouched, subject rows are not
        plain = to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(6, n_tok, c))
        background = ~tgt.any(0)
        assert torch.allclose(ours[2, background], plain[2, background], atol=1e-6)
        assert (ours[2, tgt[0]] - plain[2, tgt[0]]).abs().max() > 1e-3
    off = IRAttnState(masks=masks, mutual_cross_attention=False)
    with torch.no_grad():
        same = MaskedMutualCrossCore()(q, k, v, make_call(grid, roles, off, kind="cross", num_keys=text))
    assert torch.equal(same, F.scaled_dot_product_attention(q, k, v))


# ------------------------------------------------------------------------------------------------- layer schedule
def sdxl_topology_unet():
    """A narrow UNet with SDXL's block types and transformer depths (1, 2, 10): 70 self-attention layers."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 2, 2),
        use_linear_projection=True,
        cross_attention_dim=16,
        norm_num_groups=8,
    ).eval()


def test_default_ir_layers_are_official_blocks_36_to_69():
    """The official processor counts self-attention calls in execution order; blocks 36-69 must be our default."""
    unet = sdxl_topology_unet()
    recorder = RecordingCore()
    with apply_processors(unet, recorder, kinds=["self"]):
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 3, 16))
    order = [call.layer.name for call in recorder.calls]
    assert len(order) == 70
    ir = default_ir_layers(unet)
    assert ir == order[36:]
    assert ir[0] == "up_blocks.0.attentions.0.transformer_blocks.2.attn1" and len(ir) == 34


def test_default_ir_layers_on_the_tiny_unet():
    from attnpack.toy.tiny import tiny_unet_sdxl

    assert default_ir_layers(tiny_unet_sdxl()) == [
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.0.transformer_blocks.1.attn1",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.1.transformer_blocks.1.attn1",
    ]


# ------------------------------------------------------------------------------------------------- built-in masks
def test_attention_subject_maps_match_explicit_matrix_powers():
    """(SA + SA^2 + SA^3 + SA^4) CA[:, tokens] / 4 of the last batch row, with SA formed explicitly here."""
    from types import SimpleNamespace

    from attnpack.pipelines.ir_masks import AttentionSubjectMaps, resize_mask

    g = torch.Generator().manual_seed(6)
    maps = AttentionSubjectMaps([[2], [4, 5]], steps=(0.0, 1.0))
    expected = {}
    for grid, block in (
        ((5, 6), "down_blocks.1.attentions.0.transformer_blocks.0"),
        ((3, 3), "mid_block.attentions.0.transformer_blocks.0"),
    ):
        n_tok, text = grid[0] * grid[1], 7
        q1, k1, v1, q2 = (torch.randn(2, HEADS, n_tok, HEAD_DIM, generator=g) for _ in range(4))
        kt, vt = (torch.randn(2, HEADS, text, HEAD_DIM, generator=g) for _ in range(2))
        scale = 0.3
        self_call = make_call(grid, ["uncond", "cond"], None, name=f"{block}.attn1")
        cross_call = make_call(grid, ["uncond", "cond"], None, kind="cross", num_keys=text, name=f"{block}.attn2")
        self_call.attn = cross_call.attn = SimpleNamespace(scale=scale)
        out = maps(q1, k1, v1, self_call)
        assert torch.equal(out, F.scaled_dot_product_attention(q1, k1, v1))  # the output is untouched
        maps(q2, kt, vt, cross_call)
        sa = (q1[-1] @ k1[-1].transpose(-1, -2) * scale).softmax(-1).mean(0)
        ca = (q2[-1] @ kt[-1].transpose(-1, -2) * scale).softmax(-1).mean(0)
        x = torch.stack([ca[:, [2]].mean(-1), ca[:, [4, 5]].mean(-1)], -1)
        total = sum(torch.linalg.matrix_power(sa, p) @ x for p in range(1, 5)) / 4
        torch.testing.assert_close(maps.sums[grid], total.T, atol=1e-5, rtol=0)
        expected[grid] = total.T
    soft = maps.soft_maps()
    combined = (expected[(5, 6)].view(2, 5, 6) + resize_mask(expected[(3, 3)].view(2, 3, 3), (5, 6))) / 2
    torch.testing.assert_close(soft, combined, atol=1e-6, rtol=0)
    assert maps.masks((20, 24)).shape == (2, 20, 24)
