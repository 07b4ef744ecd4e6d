"""Test configuration: offline, deterministic, GPU/slow tests opt-in.

- ``gpu`` tests run only when CUDA is available (and are skipped otherwise).
- ``slow`` tests run only with ``ATTNPACK_RUN_SLOW=1``.
- Triton kernels run in the interpreter on machines without a GPU (``TRITON_INTERPRET=1``, set before any import).
- torch runs on one thread (``ATTNPACK_TEST_THREADS`` to change), also in subprocesses (``OMP_NUM_THREADS``).
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP synchronisation costs far more than the
# arithmetic: tests (and the subprocesses they start) run torch on one thread unless ATTNPACK_TEST_THREADS says more.
TEST_THREADS = int(os.environ.get("ATTNPACK_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))

import torch  # noqa: E402


torch.set_num_threads(TEST_THREADS)


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    """The resolved versions of the packages results depend on, first thing in every run (and so in CI's log):
    a fresh machine installs the newest releases, and a changed version is the first suspect when a test turns red."""
    import platform

    from attnpack._utils import package_versions

    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    return [f"attnpack versions: {versions}, python {platform.python_version()}"]


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("ATTNPACK_RUN_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow test: set ATTNPACK_RUN_SLOW=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _no_leaked_global_backend():
    """Tests must not leave diffusers' process-wide attention backend changed."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    after = _AttentionBackendRegistry._active_backend
    _AttentionBackendRegistry.set_active_backend(before)
    assert after == before, f"test changed diffusers' global attention backend to {after}"
