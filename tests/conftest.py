"""Test-wide settings: never touch the network, keep runs deterministic and small."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`train` sets torch's threads for its process (see modeling_multimodal/threads.py); a test's run must not
    change them for the next test (bit-exact comparisons depend on the thread count)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
