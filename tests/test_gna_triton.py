"""GNA through the fused Triton kernel: interpreter on tiny shapes (default suite), full-size shapes on GPU."""

from __future__ import annotations

import pytest
import torch

from attnpack.kernels import neighborhood_attention
from attnpack.kernels.block_sparse.naive import masked_attention
from attnpack.kernels.neighborhood import normalize_neighborhood_args
from attnpack.kernels.neighborhood.naive import neighborhood_mask
from attnpack.kernels.neighborhood.windows import neighborhood_key_indices


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _oracle(q, k, v, spec, extra_k=None, extra_v=None):
    mask = neighborhood_mask(spec.grid, spec.window, spec.stride, spec.dilation, spec.causal)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    if extra_k is not None:
        k = torch.cat([k, extra_k.cpu()], dim=2)
        v = torch.cat([v, extra_v.cpu()], dim=2)
        mask = torch.cat([mask, torch.ones(mask.shape[0], extra_k.shape[2], dtype=torch.bool)], dim=1)
    return masked_attention(q, k, v, mask)


TINY = [
    # grid, window, stride, dilation, causal, extra keys
    ((37,), 7, 3, 1, False, 5),
    ((9, 10), (4, 5), (2, 1), (2, 1), (False, True), 0),
    ((3, 6, 7), (2, 3, 3), (1, 3, 1), 1, (True, False, False), 4),
]


@pytest.mark.parametrize("case", TINY, ids=lambda c: "g{}-w{}-s{}-d{}-c{}-x{}".format(*c).replace(" ", ""))
def test_triton_neighborhood_against_reference(case):
    grid, window, stride, dilation, causal, extra = case
    spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)
    n = spec.num_tokens
    q, k, v = (_rand(2, 2, n, 16, seed=s) for s in range(3))
    ek, ev = (_rand(2, 2, extra, 16, seed=s) for s in (5, 6)) if extra else (None, None)
    out = neighborhood_attention(
        q, k, v, grid_shape=grid, window_size=window, stride=stride, dilation=dilation, is_causal=causal,
        additional_keys=ek, additional_values=ev, backend="triton",
    )  # fmt: skip
    torch.testing.assert_close(out.cpu().double(), _oracle(q, k, v, spec, ek, ev), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_neighborhood_half_precision(dtype):
    grid, window = (8, 8), (3, 5)
    spec = normalize_neighborhood_args(grid, window)
    q, k, v = (_rand(1, 2, 64, 32, dtype=dtype, seed=s) for s in range(3))
    out = neighborhood_attention(q, k, v, grid_shape=grid, window_size=window, backend="triton")
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), _oracle(q, k, v, spec), atol=1e-2, rtol=0)


def test_triton_fully_block_sparse_configuration():
    """Stride = tile = window / 2 aligned: every visited tile is full (no mask evaluated at all)."""
    from attnpack.kernels.neighborhood import cached_neighborhood_pattern

    spec = normalize_neighborhood_args((8, 16), (4, 8), (4, 8))
    assert cached_neighborhood_pattern(spec, q_tile=(4, 4)).stats()["fully_block_sparse"]
    q, k, v = (_rand(1, 1, 128, 16, seed=s) for s in range(3))
    out = neighborhood_attention(
        q, k, v, grid_shape=(8, 16), window_size=(4, 8), stride=(4, 8), backend="triton", q_tile_shape=(4, 4)
    )
    torch.testing.assert_close(out.cpu().double(), _oracle(q, k, v, spec), atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- GPU, full size
def _rows_oracle(q, k, v, spec, rows, extra_k=None, extra_v=None):
    """Exact GNA output of selected query rows, gathered from the definition (independent of tiles), fp32."""
    keys, valid = neighborhood_key_indices(spec, rows)
    k_n = k[:, :, keys].float()  # [B, H, R, W, D]
    v_n = v[:, :, keys].float()
    qr = q[:, :, rows].float()
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bhrd,bhrwd->bhrw", qr, k_n) * scale
    s = s.masked_fill(~valid, float("-inf"))
    if extra_k is not None:
        s = torch.cat([s, torch.einsum("bhrd,bhmd->bhrm", qr, extra_k.float()) * scale], dim=-1)
        v_n = torch.cat([v_n, extra_v.float()[:, :, None].expand(-1, -1, len(rows), -1, -1)], dim=3)
    return torch.einsum("bhrw,bhrwd->bhrd", torch.softmax(s, -1), v_n)


GPU_CASES = [
    # FLUX 1024^2: 64x64 image + 512 text, window 33
    ((64, 64), 33, 1, 512),
    # FLUX 4K with stride 16 (fully block-sparse)
    ((256, 256), 80, 16, 0),
    # HunyuanVideo 720p GNA
    ((30, 48, 80), (18, 24, 24), (16, 8, 8), 0),
    # HunyuanVideo 720p NA (stride 1: many partial tiles)
    ((30, 48, 80), (18, 24, 24), 1, 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "g{}-w{}-s{}-x{}".format(*c).replace(" ", ""))
def test_gpu_full_size_against_reference_rows(case, backend):
    grid, window, stride, extra = case
    spec = normalize_neighborhood_args(grid, window, stride)
    n = spec.num_tokens
    q, k, v = (_rand(1, 4, n, 128, dtype=torch.bfloat16, seed=s) for s in range(3))
    ek, ev = (_rand(1, 4, extra, 128, dtype=torch.bfloat16, seed=s) for s in (5, 6)) if extra else (None, None)
    with torch.no_grad():
        out = neighborhood_attention(
            q, k, v, grid_shape=grid, window_size=window, stride=stride,
            additional_keys=ek, additional_values=ev, backend=backend,
        )  # fmt: skip
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:128].to(DEVICE)
    rows = torch.cat([rows, torch.tensor([0, n - 1], device=DEVICE)])
    ref = _rows_oracle(q, k, v, spec, rows, ek, ev)
    torch.testing.assert_close(out[:, :, rows].float(), ref, atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_gpu_flex_backward_matches_reference():
    grid, window, stride = (32, 48), (9, 12), (1, 4)
    q, k, v = (_rand(2, 4, 32 * 48, 64, seed=s).requires_grad_() for s in range(3))
    ek, ev = (_rand(2, 4, 16, 64, seed=s).requires_grad_() for s in (5, 6))
    grad = _rand(2, 4, 32 * 48, 64, seed=9)
    grads = []
    for backend in ("flex", "reference"):
        for t in (q, k, v, ek, ev):
            t.grad = None
        out = neighborhood_attention(
            q, k, v, grid_shape=grid, window_size=window, stride=stride,
            additional_keys=ek, additional_values=ev, backend=backend,
        )  # fmt: skip
        (out * grad).sum().backward()
        grads.append([out.detach()] + [t.grad.clone() for t in (q, k, v, ek, ev)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


@pytest.mark.gpu
def test_gpu_automatic_choice_is_triton_for_inference(caplog):
    q = _rand(1, 2, 64 * 64, 64, dtype=torch.bfloat16)
    with caplog.at_level("DEBUG", logger="attnpack.kernels.neighborhood"), torch.no_grad():
        neighborhood_attention(q, q, q, grid_shape=(64, 64), window_size=17)
    assert "picked 'triton'" in caplog.text


# how the kernel reads K / V and evaluates the mask: the default (tokens permuted into tile-major order, tensor
# descriptors, tile-local mask), gathers fused into the loads, plain pointer loads of the permuted rows, and the
# index mask on original key indices (the rule written a second way)
KERNEL_VARIANTS = [
    ("default", {}, False),
    ("fused-gather", {"permute": False}, False),
    ("no-tma", {"permute": True, "tma": False}, False),
    ("index-mask", {}, True),
    ("index-mask-fused-gather", {"permute": False}, True),
]


@pytest.mark.parametrize("variant", KERNEL_VARIANTS, ids=lambda v: v[0])
@pytest.mark.parametrize("case", TINY, ids=lambda c: "g{}-w{}-s{}-d{}-c{}-x{}".format(*c).replace(" ", ""))
def test_triton_kernel_variants_against_reference(case, variant):
    import dataclasses

    from attnpack.kernels.block_sparse import block_sparse_attention
    from attnpack.kernels.neighborhood import cached_neighborhood_pattern

    grid, window, stride, dilation, causal, extra = case
    _, options, index_mask = variant
    spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)
    pattern = cached_neighborhood_pattern(spec, num_extra=extra, device=DEVICE)
    assert pattern.mask.triton_tile_fn is not None
    if index_mask:
        pattern = dataclasses.replace(pattern, mask=dataclasses.replace(pattern.mask, triton_tile_fn=None), _cache={})
    n = spec.num_tokens
    q = _rand(2, 2, n, 16, seed=1)
    k, v = (_rand(2, 2, n + extra, 16, seed=s) for s in (2, 3))
    out, lse = block_sparse_attention(q, k, v, pattern, backend="triton", return_lse=True, backend_options=options)
    ek, ev = (k[:, :, n:], v[:, :, n:]) if extra else (None, None)
    ref = _oracle(q, k[:, :, :n], v[:, :, :n], spec, ek, ev)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=0)
    # the log-sum-exp comes back in the caller's order too
    mask = neighborhood_mask(spec.grid, spec.window, spec.stride, spec.dilation, spec.causal)
    mask = torch.cat([mask, torch.ones(n, extra, dtype=torch.bool)], dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.cpu().double(), k.cpu().double()) * 16**-0.5
    ref_lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", KERNEL_VARIANTS[:3], ids=lambda v: v[0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_variants_half_precision(dtype, variant):
    from attnpack.kernels.block_sparse import block_sparse_attention
    from attnpack.kernels.neighborhood import cached_neighborhood_pattern

    grid, window = (8, 12), (3, 5)
    spec = normalize_neighborhood_args(grid, window, dilation=(1, 2))
    q, k, v = (_rand(1, 2, 96, 32, dtype=dtype, seed=s) for s in range(3))
    pattern = cached_neighborhood_pattern(spec, q_tile=(4, 4), device=DEVICE)
    out = block_sparse_attention(q, k, v, pattern, backend="triton", backend_options=variant[1])
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), _oracle(q, k, v, spec), atol=1e-2, rtol=0)


def test_triton_owned_queries_only():
    """Ring attention's query subset through the Triton kernel (tile-local masks keep their global coordinates)."""
    from attnpack.kernels.neighborhood import neighborhood_attention_spec

    spec = normalize_neighborhood_args((9, 10), (4, 5), (2, 1), (2, 1), (False, True))
    q, k, v = (_rand(1, 2, 90, 16, seed=s) for s in range(3))
    owned = torch.arange(23, 61, device=q.device)
    q_owned = torch.zeros_like(q).index_copy_(2, owned, q[:, :, owned])
    out = neighborhood_attention_spec(q_owned, k, v, spec, backend="triton", query_positions=owned)
    torch.testing.assert_close(out.cpu().double(), _oracle(q, k, v, spec)[:, :, owned.cpu()], atol=2e-5, rtol=0)
