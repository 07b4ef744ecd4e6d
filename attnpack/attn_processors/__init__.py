"""diffusers-compatible attention processors: family adapters x attention cores.

See ``docs/architecture.md``. One module per technique; the shared machinery is:

- :mod:`.families` -- model-family adapters (the only code that knows diffusers model internals);
- :mod:`.context` -- the per-call run context (token grid, step, batch roles) set by a denoiser hook;
- :mod:`.processor` -- the generic processor, layer selection and restore handles.
"""

from .context import RunState, current_run, run_overrides
from .families import LayerInfo, TokenLayout, dense_attention, family_of_model
from .processor import (
    AttentionCall,
    AttentionCore,
    AttnPackProcessor,
    DenseCore,
    ProcessorHandle,
    apply_processors,
    list_layers,
    resolve_denoisers,
    select_layers,
    set_attention_backend,
)


__all__ = [
    "AttentionCall",
    "AttentionCore",
    "AttnPackProcessor",
    "DenseCore",
    "LayerInfo",
    "ProcessorHandle",
    "RunState",
    "TokenLayout",
    "apply_processors",
    "current_run",
    "dense_attention",
    "family_of_model",
    "list_layers",
    "resolve_denoisers",
    "run_overrides",
    "select_layers",
    "set_attention_backend",
]
