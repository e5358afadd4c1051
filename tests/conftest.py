"""Test set-up shared by all tests.

Triton kernels run in Triton's CPU interpreter when no GPU is present. The interpreter is chosen by Triton when a
kernel is decorated, so it must be set before any d3s2 kernel module is imported; this is the only place that sets it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never reach the internet. huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, when imported, and sends
# requests of its own to that endpoint (it fetches /api/agent-harnesses while building request headers): import it
# now with the endpoint at a closed local port, before any test changes the environment. d3s2 reads both variables at
# each call (d3s2.hub_settings): every test runs offline (`_offline_hub` below) unless it starts the local hub server
# of tests/hub_server.py and points HF_ENDPOINT there.
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
try:
    import huggingface_hub.constants  # noqa: F401,E402
except ImportError:
    pass
del os.environ["HF_ENDPOINT"]


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny CPU runs
    wait on a second thread more than they gain from it when other jobs share the machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
