"""transformers' own common model tests (`ModelTesterMixin`, of the installed version), run against our classes.

The tests come from transformers' source distribution, which the wheel does not ship; nothing is
downloaded here. Point `TRANSFORMERS_TESTS_DIR` at the `tests/` folder of the unpacked sdist of the
installed version (`scripts/setup_transformers_tests.sh` unpacks it into .cache/, and scripts/test.sh points there), or
leave it unset to skip this module. Two of the sdist's own imports are missing from it
(`tests/exporters/test_export.py`, `tests/generation/test_utils.py`, only in the git repository):
they are replaced by empty mixins, so the export and generation tests do not run here (ours:
test_transformers_contract.py, test_modeling.py).

Every test of the mixin runs against a tiny model whose batch holds an image, a video and an audio clip per
sample, except those listed in `NOT_APPLICABLE` (with the reason, as transformers' own model tests skip what
does not apply to them) and `KNOWN_DIFFERENCES` (expected to fail, with the reason). The mixin skips its
GPU, multi-GPU, DeepSpeed, flash-attention and `slow` tests itself.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import unittest
from pathlib import Path

import pytest

TESTS_DIR = Path(os.environ.get("TRANSFORMERS_TESTS_DIR", "/nonexistent"))
if not (TESTS_DIR / "test_modeling_common.py").is_file():
    pytest.skip(
        "transformers' common tests are not here: set TRANSFORMERS_TESTS_DIR to the tests/ folder of the unpacked "
        "transformers sdist (pip download --no-deps --no-binary :all: transformers==<installed version>)",
        allow_module_level=True,
    )
pytest.importorskip("parameterized", reason="transformers' common tests import `parameterized` (pip install parameterized)")


def load_common_tests():
    """`tests.test_modeling_common` of the sdist, imported as the package `hf_common_tests` with its two
    missing siblings stubbed."""
    package = types.ModuleType("hf_common_tests")
    package.__path__ = [str(TESTS_DIR)]
    sys.modules.setdefault("hf_common_tests", package)
    for name, mixin in (("exporters.test_export", "ExportTesterMixin"), ("generation.test_utils", "GenerationTesterMixin")):
        parent = f"hf_common_tests.{name.split('.')[0]}"
        sys.modules.setdefault(parent, types.ModuleType(parent)).__path__ = []
        stub = types.ModuleType(f"hf_common_tests.{name}")
        setattr(stub, mixin, type(mixin, (), {}))
        sys.modules.setdefault(stub.__name__, stub)
    return importlib.import_module("hf_common_tests.test_modeling_common")


common = load_common_tests()
# The mixin finds a class's role by its name in transformers' static mappings (LlavaModel is a base model, so no
# loss; LlavaForConditionalGeneration takes `labels`); ours registers with the Auto classes at run time instead.
common.MODEL_MAPPING_NAMES = {**common.MODEL_MAPPING_NAMES, "multimodal": "MultimodalModel"}
common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES = {
    **common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "multimodal": "MultimodalForConditionalGeneration"
}

from test_modeling import TOKENIZER, collate, sample  # noqa: E402

from modeling_multimodal import MultimodalForConditionalGeneration, MultimodalModel  # noqa: E402
from modeling_multimodal.testing_utils import tiny_config  # noqa: E402


class MultimodalModelTester:
    """What the mixin asks of a model tester: a tiny config and a batch with every modality."""

    batch_size = 2
    is_training = True

    def __init__(self, parent):
        self.parent = parent
        config = self.get_config()
        text = config.text_config
        self.vocab_size, self.hidden_size = text.vocab_size, text.hidden_size
        self.num_hidden_layers, self.num_attention_heads = text.num_hidden_layers, text.num_attention_heads
        inputs = self.prepare_inputs(config)
        self.seq_length = inputs["input_ids"].shape[1]

    def get_config(self):
        return tiny_config(TOKENIZER)

    def prepare_inputs(self, config):
        model = types.SimpleNamespace(config=config)
        # One item of each modality per sample, so that slicing the batch (as the mixin does) keeps each sample's media.
        return collate([sample(model, images=1, audios=(120,), videos=1), sample(model, images=1, audios=(80,), videos=1)])

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        return config, self.prepare_inputs(config)


# Common tests that cannot apply to this model, and why (as transformers' own model tests skip them).
NOT_APPLICABLE = {
    "test_eager_matches_sdpa_inference": "extends the batch with random ids in [0, 5) and passes only input_ids: in the "
    "tiny vocabulary those ids include the media placeholders, and a placeholder without its media is an error here "
    "(LLaVA's tester picks placeholder ids outside that range); eager vs SDPA of the LM itself is transformers' test",
    "test_model_rope_scaling_from_config": "random ids over the whole vocabulary without media: placeholders without "
    "their media are refused; RoPE scaling is the LM's own (LlamaModel's tests)",
    "test_generation_tester_mixin_inheritance": "GenerationTesterMixin is not in the sdist (stubbed above); generation "
    "is covered by test_transformers_contract.py and test_modeling.py",
}

# Where our classes differ from transformers 5.24 on purpose or by a known gap: expected failures (strict, so that a
# fix shows), each with the reason. See the README's contract section.
KNOWN_DIFFERENCES: dict[str, str] = {}  # none left: every gap the mixin found is fixed


def _mark(cls):
    """Skip the not-applicable tests (with their `name_<case>` variants) and expect the known differences to fail."""
    for name in dir(cls):
        for prefix, reason in NOT_APPLICABLE.items():
            if name == prefix or name.startswith(prefix + "_"):
                setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
        if name in KNOWN_DIFFERENCES:
            setattr(cls, name, pytest.mark.xfail(reason=KNOWN_DIFFERENCES[name], strict=True)(getattr(cls, name)))
    return cls


@_mark
class MultimodalCommonTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MultimodalModel, MultimodalForConditionalGeneration)
    _is_composite = True
    # The retrieval head gets gradients from `L_contrastive` alone, which needs paired texts (`pair_input_ids`) that the
    # mixin's batches (input_ids + labels) do not carry.
    test_all_params_have_gradient = False
    # As LLaVA-NeXT-Video's, `get_video_features().last_hidden_state` is the vision tower's output over all frames
    # (n * frames rows), not one row per video; `pooler_output` (one entry per video) is still checked.
    skip_test_video_features_output_shape = True

    def setUp(self):
        self.model_tester = MultimodalModelTester(self)
