"""attnpack techniques under diffusers' context parallelism: 2 CPU processes over gloo (Ulysses; ring for GNA and
CLEAR) and 4 (unified ring x Ulysses) give the image of one process, and what cannot work (PARO and head guidance under
ring attention, models without a context-parallel plan, observers) refuses clearly.

Reference: the same pipeline and technique run in the test process itself, without parallelism. Each technique gets a
fresh tiny pipeline per process (``enable_parallelism`` cannot be undone); all cases of a model run in one 2-process
launch so the suite pays the start-up of the processes once per model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_distributed
from test_paro_plan import make_plan

import attnpack
from attnpack.attn_processors import list_layers
from attnpack.attn_processors.context import ParallelLayout
from attnpack.attn_processors.parallel import check_parallel_support, global_layout
from attnpack.attn_processors.paro import PARO_KINDS
from attnpack.toy.tiny import build_tiny_pipeline


ATOL = 1e-4  # issue 24: images in [0, 1] equal within 1e-4 (float summation order only)

CALLS = {
    "tiny-flux": dict(prompt="a red cat", height=128, width=128, num_inference_steps=3, max_sequence_length=32),
    "tiny-wan": dict(
        prompt="a red cat", height=64, width=64, num_frames=9, num_inference_steps=3, max_sequence_length=16
    ),
}
GRIDS = {"tiny-flux": ((8, 8), 32), "tiny-wan": ((3, 4, 4), 0)}  # grid at the attention layers, joint text tokens


class HeadScaledCore:
    """Dense attention with head ``h`` scaled by ``1 + h / 4``: a pattern that works on cross-attention and depends
    on which heads a rank holds (``call.heads``)."""

    def __call__(self, query, key, value, call):
        held = torch.arange(call.layer.heads)[call.heads if call.heads is not None else slice(None)]
        return call.dense(query, key, value) * (1 + held.to(query.dtype) / 4)[None, :, None, None]


class SubsetDenseCore:
    """Dense attention that computes only the owned queries under ring attention: stands in for diffusers' ring
    attention on the layers no technique covers (Wan's text cross-attention), which on CPU has no backend returning
    the log-sum-exp it needs."""

    query_subset = True

    def __call__(self, query, key, value, call):
        return call.dense(query if call.queries is None else query.index_select(2, call.queries), key, value)


def _paro_plan(name, pipe):
    grid, text = GRIDS[name]
    model = pipe.transformer
    layers = tuple(i.name for i in list_layers(model) if i.kind in PARO_KINDS)
    family = "flux" if name == "tiny-flux" else "wan"
    return make_plan(
        model,
        grid=grid,
        text_len=text,
        layers=layers,
        heads=2,
        family=family,
        seed=3,
        block_size=4,
        text_first=True,
        num_inference_steps=3,
        timestep_buckets=1,
    )


# name -> (models it runs on, apply(pipe, model_name)); heads are (layer, head) with one head per rank under ulysses=2
TECHNIQUES = {
    "dense": (("tiny-flux", "tiny-wan"), lambda pipe, name: None),
    "gna": (("tiny-flux", "tiny-wan"), lambda pipe, name: attnpack.apply_gna(pipe, window_size=3)),
    "clear": (("tiny-flux",), lambda pipe, name: attnpack.apply_clear(pipe, radius=2)),
    "paro": (
        ("tiny-flux", "tiny-wan"),
        lambda pipe, name: attnpack.apply_paro(pipe, _paro_plan(name, pipe), quant=None),
    ),
    "head-guidance": (
        ("tiny-flux", "tiny-wan"),
        lambda pipe, name: attnpack.apply_head_perturbation(pipe, heads="L0H1,L1H0", scale=2.0, softness=0.7),
    ),
    "cross-attention": (  # Wan text cross-attention: queries exchanged, the replicated text keys sliced per rank
        ("tiny-wan",),
        lambda pipe, name: attnpack.apply_processors(pipe, HeadScaledCore(), kinds=["cross"], technique="scaled"),
    ),
    "gna-ring": (  # GNA, and on Wan's cross-attention dense attention computed by attnpack (SubsetDenseCore)
        ("tiny-flux", "tiny-wan"),
        lambda pipe, name: (
            attnpack.apply_gna(pipe, window_size=3),
            name == "tiny-wan" and attnpack.apply_processors(pipe, SubsetDenseCore(), kinds=["cross"], technique="d"),
        ),
    ),
    "gna+head-guidance": (
        ("tiny-flux",),
        lambda pipe, name: (
            attnpack.apply_gna(pipe, window_size=3),
            attnpack.apply_head_perturbation(pipe, heads="L0H1,L2H0", scale=2.0, kind="uniform"),
        ),
    ),
}


def _enable(pipe, parallel: dict) -> None:
    """`enable_context_parallel`, or (``direct=True``) diffusers' `enable_parallelism` without attnpack's checks."""
    from diffusers import ContextParallelConfig

    from attnpack.pipelines.parallel import cpu_device_count_patch, enable_context_parallel

    parallel = dict(parallel)
    if parallel.pop("direct", False):
        with cpu_device_count_patch():
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(**parallel))
    else:
        enable_context_parallel(pipe, **parallel)


def _generate(name: str, technique: str, parallel: dict | None, apply_first: bool = True) -> np.ndarray:
    pipe = build_tiny_pipeline(name)
    apply = TECHNIQUES[technique][1]
    if parallel is not None and not apply_first:
        _enable(pipe, parallel)
        stock = dict(pipe.transformer.attn_processors)
        try:
            apply(pipe, name)
        except ValueError:  # refused at apply time: the model is left as it was
            assert pipe.transformer.attn_processors == stock
            raise
    else:
        apply(pipe, name)
    if parallel is not None and apply_first:
        _enable(pipe, parallel)
    out = pipe(**CALLS[name], generator=torch.Generator().manual_seed(0), output_type="np")
    return np.asarray(out.frames if hasattr(out, "frames") else out.images, dtype=np.float32)


def _worker(rank: int, name: str, cases: list[tuple[str, dict, bool]]) -> dict:
    results = {}
    for technique, parallel, apply_first in cases:
        key = f"{technique}|{sorted(parallel.items())}|{apply_first}"
        try:
            results[key] = _generate(name, technique, parallel, apply_first)
        except ValueError as err:
            results[key] = f"ValueError: {err}"
    return results


ULYSSES = dict(ulysses_degree=2)
RING = dict(ulysses_degree=1, ring_degree=2)
RING_DIRECT = dict(ring_degree=2, direct=True)  # diffusers' enable_parallelism: attnpack refuses at the first step


UNIFIED = dict(ulysses_degree=2, ring_degree=2)
# dense attention under ring attention is diffusers' own (it needs a CUDA backend returning the log-sum-exp): every
# layer of a ring case runs an attnpack core here
RING_WORKS = {"tiny-flux": ("gna-ring", "clear"), "tiny-wan": ("gna-ring",)}
RING_REFUSED = [
    ("head-guidance", RING, True),
    ("paro", RING, True),
    ("paro", RING, False),
    ("paro", RING_DIRECT, True),
]


def _cases(name):
    cases = [(t, ULYSSES, True) for t, (models, _) in TECHNIQUES.items() if name in models and t != "gna-ring"]
    cases.append(("gna", ULYSSES, False))  # parallelism enabled before the technique: same result
    cases += [(t, RING, True) for t in RING_WORKS[name]]
    cases += [("gna-ring", RING, False), ("gna-ring", RING_DIRECT, True)]
    if name == "tiny-wan":  # GNA alone: the text cross-attention stays diffusers' dense, on the `native` backend
        cases.append(("gna", RING, True))
    return cases + RING_REFUSED


def _unified_cases(name):
    return [(t, UNIFIED, True) for t in RING_WORKS[name]]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """One 2-process launch per model (lazily), results of rank 0 and rank 1."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_distributed(_worker, 2, name, _cases(name), tmp_path=tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def unified_launches(tmp_path_factory):
    """One 4-process launch per model (ring 2 x Ulysses 2), results of every rank."""
    cache = {}

    def get(name):
        if name not in cache:
            tmp = tmp_path_factory.mktemp(f"{name}-unified")
            cache[name] = run_distributed(_worker, 4, name, _unified_cases(name), tmp_path=tmp)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(name, technique):
        if (name, technique) not in cache:
            cache[name, technique] = _generate(name, technique, None)
        return cache[name, technique]

    return get


def _key(technique, parallel, apply_first=True):
    return f"{technique}|{sorted(parallel.items())}|{apply_first}"


PARAMS = [(n, t) for t, (models, _) in TECHNIQUES.items() for n in models if t != "gna-ring"]


@pytest.mark.parametrize("name,technique", PARAMS)
def test_ulysses_matches_one_process(launches, references, name, technique):
    ranks = launches(name)
    reference = references(name, technique)
    for rank, results in enumerate(ranks):
        out = results[_key(technique, ULYSSES)]
        assert not isinstance(out, str), out
        diff = float(np.abs(out - reference).max())
        assert diff <= ATOL, f"{name} {technique} rank {rank}: max |2 processes - 1 process| = {diff:.2e}"
    if technique != "dense":  # the technique changes the image: the comparison can see a wrong technique
        assert float(np.abs(reference - references(name, "dense")).max()) > 10 * ATOL


@pytest.mark.parametrize("name", list(CALLS))
def test_parallelism_enabled_before_the_technique(launches, references, name):
    out = launches(name)[0][_key("gna", ULYSSES, apply_first=False)]
    assert not isinstance(out, str), out
    assert float(np.abs(out - references(name, "gna")).max()) <= ATOL


def _assert_same(out, reference, what):
    assert not isinstance(out, str), f"{what}: {out}"
    diff = float(np.abs(out - reference).max())
    assert diff <= ATOL, f"{what}: max |parallel - 1 process| = {diff:.2e}"


RING_PARAMS = [(n, t) for n, ts in RING_WORKS.items() for t in ts]


@pytest.mark.parametrize("name,technique", RING_PARAMS)
def test_ring_attention_matches_one_process(launches, references, name, technique):
    """GNA and CLEAR under ring attention (ring_degree=2): each rank computes its own queries against the gathered
    keys, and the image is the one of one process."""
    reference = references(name, technique)
    for rank, results in enumerate(launches(name)):
        _assert_same(results[_key(technique, RING)], reference, f"{name} {technique} ring rank {rank}")
    assert float(np.abs(reference - references(name, "dense")).max()) > 10 * ATOL


@pytest.mark.parametrize("name", list(CALLS))
def test_ring_enabled_before_the_technique_and_directly(launches, references, name):
    """Ring parallelism set up before the technique, or by diffusers' own `enable_parallelism`: the same image."""
    for results in launches(name):
        for parallel, apply_first in ((RING, False), (RING_DIRECT, True)):
            _assert_same(results[_key("gna-ring", parallel, apply_first)], references(name, "gna-ring"), name)


@pytest.mark.parametrize("name,technique", [(n, t) for n, t in RING_PARAMS if n == "tiny-flux"])
def test_unified_attention_matches_one_process(unified_launches, references, name, technique):
    """Unified attention (ring 2 x Ulysses 2, 4 processes): the Ulysses all-to-all inside each ring rank's pair, then
    the ring; every rank ends with the image of one process. tiny-flux only (its two streams make the shard order the
    harder one; tiny-wan's ring path is covered by the 2- and 3-process tests), to keep the suite's time."""
    for rank, results in enumerate(unified_launches(name)):
        _assert_same(results[_key(technique, UNIFIED)], references(name, technique), f"{name} {technique} rank {rank}")


@pytest.mark.parametrize("name", list(CALLS))
def test_ring_attention_is_refused_before_any_work(launches, name):
    """PARO and head guidance under ring attention refuse, naming the reason and the fix (Ulysses)."""
    for results in launches(name):
        for technique, parallel, apply_first in RING_REFUSED:
            message = results[_key(technique, parallel, apply_first)]
            assert isinstance(message, str) and "does not support ring attention (ring_degree=2)" in message, message
            assert "ulysses_degree=N" in message and "Ring attention runs clear and gna" in message
            if technique == "paro":
                assert "reordering spreads every attention block over all shards" in message


def test_ring_dense_layers_on_native_are_refused_at_the_first_step(launches):
    """GNA on Wan's self-attention under ring attention, its text cross-attention left to diffusers on the default
    `native` backend (which has no log-sum-exp): refused when the denoiser is first called, on every rank alike."""
    for results in launches("tiny-wan"):
        message = results[_key("gna", RING)]
        assert isinstance(message, str) and "runs 2 dense attention layer(s)" in message, message
        assert "'blocks.0.attn2'" in message and "set_attention_backend(pipe, '_native_cudnn')" in message


# ------------------------------------------------------------------------------------------------- no processes
def _layout(ulysses=2, ring=1, **kw):
    return ParallelLayout(ulysses_degree=ulysses, ring_degree=ring, rank=0, ulysses_rank=0, ring_rank=0, **kw)


def test_models_without_a_parallel_plan_are_refused():
    """IR-Diffusion, A-STAR and head guidance on UNets (no diffusers context-parallel plan) refuse, naming the fix."""
    pipe = build_tiny_pipeline("tiny-sd15")
    attnpack.apply_head_perturbation(pipe, heads="L0", scale=1.0)
    with pytest.raises(ValueError, match="cannot run under context parallelism on a 'unet' denoiser"):
        check_parallel_support(pipe.unet, _layout())


def test_heads_not_divisible_and_uneven_shards_are_refused():
    pipe = build_tiny_pipeline("tiny-flux")
    attnpack.apply_gna(pipe, window_size=3)
    with pytest.raises(ValueError, match="2 heads, not divisible by ulysses_degree=4"):
        check_parallel_support(pipe.transformer, _layout(ulysses=4))
    with pytest.raises(ValueError, match="does not support `ulysses_anything`"):
        check_parallel_support(pipe.transformer, _layout(anything=True))
    check_parallel_support(pipe.transformer, _layout())  # supported


def test_unified_degrees_and_observers_are_refused():
    from attnpack import ObserverCore, apply_processors

    class Recorder(ObserverCore):
        def observe(self, query, key, value, call, out):
            pass

    pipe = build_tiny_pipeline("tiny-flux")
    with attnpack.apply_head_perturbation(pipe, heads="L0H1", scale=1.0):
        with pytest.raises(ValueError, match="does not support ring attention \\(ring_degree=2\\)"):
            check_parallel_support(pipe.transformer, _layout(ulysses=2, ring=2))  # unified (ring x Ulysses)
    with attnpack.apply_gna(pipe, window_size=3):
        check_parallel_support(pipe.transformer, _layout(ulysses=2, ring=2))  # GNA runs under it
    apply_processors(pipe, Recorder(), technique="recorder")
    with pytest.raises(ValueError, match="`Recorder` on layer .* records attention maps"):
        check_parallel_support(pipe.transformer, _layout())


def test_ring_refuses_dense_layers_on_a_backend_without_lse():
    """Dense layers under ring attention are diffusers' own ring attention, which merges partial softmaxes with their
    log-sum-exp: on the default `native` backend (no log-sum-exp) it would raise at the first step. Refused before any
    work, naming a layer and the fix; with a log-sum-exp backend, or attnpack on every layer, it is accepted."""
    pipe = build_tiny_pipeline("tiny-wan")
    attnpack.apply_gna(pipe, window_size=3)  # self-attention only: Wan's text cross-attention stays diffusers' dense
    model = pipe.transformer
    with pytest.raises(ValueError, match=r"runs 2 dense attention layer\(s\) .*'blocks.0.attn2'.*they use 'native'"):
        check_parallel_support(model, _layout(ulysses=1, ring=2), at_run=True)
    check_parallel_support(model, _layout(), at_run=True)  # Ulysses needs no log-sum-exp
    check_parallel_support(model, _layout(ulysses=1, ring=2))  # not at run time: more techniques may follow
    for name, processor in model.attn_processors.items():
        if "attn2" in name:
            processor._attention_backend = "flash"  # what `set_attention_backend("flash")` sets (flash: CUDA only)
    check_parallel_support(model, _layout(ulysses=1, ring=2), at_run=True)
    pipe = build_tiny_pipeline("tiny-wan")
    attnpack.apply_gna(pipe, window_size=3)
    attnpack.apply_processors(pipe, SubsetDenseCore(), kinds=["cross"], technique="d")
    check_parallel_support(pipe.transformer, _layout(ulysses=1, ring=2), at_run=True)  # attnpack on every layer


def test_parallel_layout_shards_and_heads():
    """Wan2.1-14B at 720p under Ulysses 8: rank 3 holds tokens 28,350..37,799 and heads 15..19 (docs/architecture.md)."""
    layout = ParallelLayout(ulysses_degree=8, ring_degree=1, rank=3, ulysses_rank=3, ring_rank=0)
    assert layout.world == 8 and layout.local_len(75_600) == 9_450
    assert layout.shard(75_600) == slice(28_350, 37_800) and layout.heads(40) == slice(15, 20)


def test_global_layout_regroups_flux_streams():
    """FLUX ranks hold [text shard, image shard]; after the all-to-all the streams are regrouped in rank order."""
    from attnpack.attn_processors.context import RunState
    from attnpack.attn_processors.families import TokenLayout

    local = TokenLayout.joint(3, 2, None, text_first=True)  # 2 text then 3 image tokens on each of 2 ranks
    run = RunState(family="flux", grid=(2, 3), text_len=4, image_len=6)
    layout, perm = global_layout(local, _layout(), run)
    assert layout.text == slice(0, 4) and layout.image == slice(4, 10) and layout.grid == (2, 3)
    # gathered: [t0 t1 i0 i1 i2 | t2 t3 i3 i4 i5] -> global [t0..t3, i0..i5]
    assert perm.tolist() == [0, 1, 5, 6, 2, 3, 4, 7, 8, 9]


# ------------------------------------------------------------------------------------------------- the command line
def _attnpack_cli(args: list[str], processes: int = 1):
    """``python -m attnpack ARGS`` in a fresh process, or under ``torchrun`` with ``processes`` ranks (gloo on CPU);
    asserts it succeeded and returns the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(processes),
            "--master-port",
            str(free_port()),
        ]
    done = subprocess.run([*launcher, "-m", "attnpack", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def test_generate_command_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m attnpack generate ... --ulysses-degree 2` (and `--ring-degree 2`) writes the
    image of one process."""

    from PIL import Image

    from attnpack import read_parameters

    args = ["generate", "-m", "tiny-flux", "-p", "a red cat", "--steps", "3", "--height", "128", "--width", "128"]
    args += ["-t", "gna", "--opt", "window_size=3"]
    _attnpack_cli([*args, "-o", str(tmp_path / "one.png")])
    two = _attnpack_cli([*args, "--ulysses-degree", "2", "-o", str(tmp_path / "two.png")], processes=2)
    assert two.stderr.count("wrote ") == 1  # written once, by the first process
    a = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "two.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # 8-bit images: float-order differences may move a value by one grey level
    assert read_parameters(tmp_path / "two.png")["context_parallel"] == {"ring": 1, "ulysses": 2}
    ring = _attnpack_cli([*args, "--ring-degree", "2", "-o", str(tmp_path / "ring.png")], processes=2)
    assert ring.stderr.count("wrote ") == 1
    c = np.asarray(Image.open(tmp_path / "ring.png"), dtype=np.int16)
    assert np.abs(a - c).max() <= 1
    assert read_parameters(tmp_path / "ring.png")["context_parallel"] == {"ring": 2, "ulysses": 1}


def test_generate_command_needs_torchrun(tmp_path, monkeypatch, capsys):
    from attnpack.cli import main

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = ["generate", "-m", "tiny-flux", "-p", "a cat", "--ulysses-degree", "2", "-o", str(tmp_path / "x.png")]
    with pytest.raises(RuntimeError, match="launch with `torchrun --nproc-per-node N"):
        main(args)


def test_batch_command_under_torchrun(tmp_path):
    """`torchrun ... attnpack batch --ulysses-degree 2`: every output made by both processes, written once by the
    first, with the pixels of a one-process batch."""
    import json
    import os

    from PIL import Image

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    args = ["batch", "-m", "tiny-flux", "--prompts", str(prompts), "--steps", "3", "--height", "128", "--width", "128"]
    args += ["-t", "clear", "--opt", "radius=2"]
    _attnpack_cli([*args, "--outdir", str(tmp_path / "one")])
    two = _attnpack_cli([*args, "--ulysses-degree", "2", "--outdir", str(tmp_path / "two")], processes=2)
    assert two.stderr.count("attnpack batch: 2 written") == 1
    names = ["00000_0.png", "00001_0.png"]
    assert sorted(os.listdir(tmp_path / "two")) == sorted([*names, "metadata.jsonl"])
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "two" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name
    records = [json.loads(line) for line in (tmp_path / "two" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == names and {r["process"] for r in records} == {0}
    assert all(r["context_parallel"] == {"ring": 1, "ulysses": 2} for r in records)


def test_ring_degree_with_techniques_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from attnpack.cli import main

    monkeypatch.setattr("attnpack.pipelines.loading.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    gen = [
        "generate",
        "-m",
        "tiny-flux",
        "-p",
        "a cat",
        "-t",
        "head-guidance",
        "--ring-degree",
        "2",
        "-o",
        str(tmp_path / "x.png"),
    ]
    batch = ["batch", "-m", "tiny-flux", "--prompts", str(prompts), "--outdir", str(tmp_path / "o"), "-t", "clear"]
    batch += ["-t", "head-guidance"]
    assert main(gen) == 2
    assert "head-guidance cannot run under ring attention (--ring-degree=2)" in capsys.readouterr().err
    assert main([*batch, "--ring-degree", "2"]) == 2
    err = capsys.readouterr().err
    assert "head-guidance cannot run under ring attention (ring_degree=2): only dense attention, clear and gna" in err


def test_batch_context_parallel_needs_several_processes(tmp_path, capsys):
    from attnpack.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    args = ["batch", "-m", "tiny-flux", "--prompts", str(prompts), "--outdir", str(tmp_path / "o"), "--steps", "1"]
    assert main([*args, "--ulysses-degree", "2"]) == 2
    assert "launch with `torchrun --nproc-per-node N -m attnpack batch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.png"))


def test_ring_key_reads_follow_the_windows():
    """Which key shards a ring rank's GNA queries visit, against the brute-force GNA mask: a window of 3 frames on 8
    frames in 4 shards of 2 frames reads the neighbouring shards only (the rest are skipped), and receives at least
    the remote keys its queries see."""
    from attnpack.attn_processors.parallel import ring_key_reads
    from attnpack.kernels.neighborhood import cached_neighborhood_pattern, normalize_neighborhood_args
    from attnpack.kernels.neighborhood.naive import neighborhood_mask

    per = 32
    for window, stride in (((3, 3, 3), (1, 1, 1)), ((5, 3, 3), (2, 1, 1))):
        spec = normalize_neighborhood_args((8, 4, 4), window, stride, (1, 1, 1), (False,) * 3)
        pattern = cached_neighborhood_pattern(spec, q_tile=(1, 4, 4), kv_tile=(2, 2, 2))
        mask = neighborhood_mask((8, 4, 4), spec.window, spec.stride, spec.dilation, spec.causal)
        reads = ring_key_reads(pattern, 4)
        for r, read in enumerate(reads):
            rows = mask[r * per : (r + 1) * per]
            assert read.shards == [j for j in range(4) if bool(rows[:, j * per : (j + 1) * per].any())]
            seen = rows.any(0)
            remote_seen = (int(seen.sum()) - int(seen[r * per : (r + 1) * per].sum())) / 96
            assert remote_seen <= read.remote_fraction < 1.0
    assert [read.shards for read in reads] != [[0, 1, 2, 3]] * 4  # some shards are skipped


def _ring_unit_worker(rank: int, grid, window, backend) -> tuple:
    """GNA's core through `ring_call` on a Wan-like video stream (no diffusers model): this rank's output rows and
    the remote tokens it received / that exist."""
    import math
    import types

    import torch.distributed as dist

    from attnpack.attn_processors.context import RunState
    from attnpack.attn_processors.families import LayerInfo, TokenLayout
    from attnpack.attn_processors.gna import GNAConfig, GNACore
    from attnpack.attn_processors.parallel import RING_TRAFFIC, ring_call
    from attnpack.attn_processors.processor import AttentionCall

    world = dist.get_world_size()
    mesh = types.SimpleNamespace(get_group=lambda: dist.group.WORLD)
    config = types.SimpleNamespace(context_parallel_config=types.SimpleNamespace(_ring_mesh=mesh))
    parallel = ParallelLayout(1, world, rank, 0, rank, config=config)
    n = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for _ in range(3))
    shard = slice(rank * n // world, (rank + 1) * n // world)
    run = RunState(family="wan", grid=grid, image_len=n, parallel=parallel)
    layer = LayerInfo("blocks.0.attn1", 0, "wan", "self", 0, 2, 8)
    processor = types.SimpleNamespace(_attention_backend=None, _parallel_config=None)
    call = AttentionCall(None, layer, TokenLayout.self_attention(n // world, None), None, run, processor)
    n_axes = len(grid)
    core = GNACore(GNAConfig(window, (1,) * n_axes, (1,) * n_axes, (False,) * n_axes, None, backend))
    RING_TRAFFIC.reset()
    out = ring_call(core, q[:, :, shard], k[:, :, shard], v[:, :, shard], call, parallel)
    return out, RING_TRAFFIC.received, RING_TRAFFIC.remote


@pytest.mark.parametrize("backend", ["tiled"])  # the block-sparse path GPUs take (the CPU gather path: tiny-wan)
def test_ring_sends_only_the_keys_a_rank_reads(tmp_path, backend):
    """Ring attention of GNA on a video stream (3 ranks, 9 frames, a 3-frame window): every rank's rows equal the
    brute-force GNA attention, and each rank received only the key tokens its query tiles visit (fewer than an
    all-gather's)."""
    from attnpack.kernels.block_sparse.naive import masked_attention
    from attnpack.kernels.neighborhood.naive import neighborhood_mask

    grid, window, world = (9, 4, 4), (3, 3, 3), 3
    ranks = run_distributed(_ring_unit_worker, world, grid, window, backend, tmp_path=tmp_path)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 144, 8, generator=g) for _ in range(3))
    reference = masked_attention(q, k, v, neighborhood_mask(grid, window, (1, 1, 1), (1, 1, 1), (False,) * 3)).float()
    for rank, (out, received, remote) in enumerate(ranks):
        torch.testing.assert_close(out, reference[:, :, rank * 48 : (rank + 1) * 48], atol=2e-5, rtol=0)
        assert remote == 96 and 0 < received < remote, (rank, received, remote)
    # the middle rank needs frames 2 and 6 from its neighbours; the first and last a frame or two of one neighbour
    assert [r for _, r, _ in ranks] != [96, 96, 96]
