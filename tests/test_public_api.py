"""The public API is explicit (pinned here) and importing attnpack is cheap."""

import subprocess
import sys

import attnpack


EXPECTED = {
    "__version__",
    "AStarPipeline",
    "AStarXLPipeline",
    "segregation_loss",
    "retention_loss",
    "AttentionCall",
    "AttnPackProcessor",
    "ClearAttnProcessor",
    "DenseCore",
    "GNAAttnProcessor",
    "GenerationSettings",
    "IRDiffusionPipeline",
    "IRDiffusionSDPipeline",
    "HeadPerturbationGuidance",
    "LayerInfo",
    "ParoAttnProcessor",
    "ParoPlan",
    "ProcessorHandle",
    "RunState",
    "TokenLayout",
    "apply_clear",
    "apply_gna",
    "apply_paro",
    "apply_head_perturbation",
    "apply_processors",
    "builtin_models",
    "calibrate_paro",
    "convert_official_paro_plan",
    "current_run",
    "list_layers",
    "load_pipeline",
    "neighborhood_attention",
    "presets",
    "read_parameters",
    "run_generation",
    "run_overrides",
    "save_image",
    "save_video",
    "search_heads",
    "set_attention_backend",
    "ModifierCore",
    "ObserverCore",
    "in_effect",
    "apply_techniques",
}


def test_all_is_pinned():
    assert set(attnpack.__all__) == EXPECTED


def test_every_public_name_resolves():
    for name in attnpack.__all__:
        assert getattr(attnpack, name) is not None


def test_import_is_light():
    code = "import sys, attnpack; print('diffusers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
