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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model + processor folder (32 px images, 4 video frames), one per test module (a module may define its own)."""
    from modeling_multimodal import MultimodalForConditionalGeneration, MultimodalProcessor
    from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

    folder = tmp_path_factory.mktemp("checkpoint")
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer)
    MultimodalForConditionalGeneration(config).save_pretrained(folder)
    MultimodalProcessor.from_config_and_components(config, tokenizer).save_pretrained(folder)
    return folder
