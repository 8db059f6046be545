"""Heads exist from their weights alone, and checkpoints load wherever their heads are not built (issues 28, 31)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModel

from modeling_multimodal import MultimodalForConditionalGeneration, MultimodalModel
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

TOKENIZER = tiny_tokenizer()

HEAD_CASES = [
    # (λ, α, retrieval_head option, auxiliary heads built, retrieval head built)
    (0.0, 0.0, False, set(), False),
    (0.5, 0.0, False, {"audio_ctc", "media_bow"}, False),
    (0.0, 0.3, False, set(), True),
    (0.0, 0.0, True, set(), True),
]


@pytest.mark.parametrize("lam, alpha, option, auxiliary, retrieval", HEAD_CASES)
def test_heads_follow_their_weights(lam, alpha, option, auxiliary, retrieval):
    config = tiny_config(TOKENIZER, auxiliary_loss_weight=lam, contrastive_loss_weight=alpha, retrieval_head=option,
                         auxiliary_tasks=["audio_ctc", "media_bow"])  # fmt: skip
    model = MultimodalForConditionalGeneration(config)
    assert set(model.auxiliary_heads) == auxiliary
    assert (model.retrieval_head is not None) == retrieval
    assert any(name.startswith("retrieval_head.") for name in model.state_dict()) == retrieval


def test_no_trainable_parameter_is_left_without_gradient_at_alpha_zero():
    """λ = α = 0, a text-and-image batch: every trainable parameter outside the unused towers' paths gets a gradient."""
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, audio=False, video=False)).train()
    config = model.config
    ids = torch.tensor([[config.image_token_id] * model.config.token_layout.image_tokens() + [20, 21, 22]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], missing


def test_checkpoint_with_a_retrieval_head_loads_with_or_without_it(tmp_path):
    torch.manual_seed(0)
    trained = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, contrastive_loss_weight=0.5))
    trained.save_pretrained(tmp_path)
    # α = 0 at load time: the head is not built and its weights are ignored, without error
    plain, info = MultimodalForConditionalGeneration.from_pretrained(tmp_path, contrastive_loss_weight=0.0, output_loading_info=True)
    assert plain.retrieval_head is None
    assert not info["missing_keys"]
    # asked for: the checkpoint's head is loaded and used
    kept = MultimodalForConditionalGeneration.from_pretrained(tmp_path, contrastive_loss_weight=0.0, retrieval_head=True)
    torch.testing.assert_close(kept.retrieval_head.text_projection.weight, trained.retrieval_head.text_projection.weight)
    ids = torch.tensor([[20, 21, 22]])
    torch.testing.assert_close(kept.get_retrieval_embeddings(input_ids=ids), trained.get_retrieval_embeddings(input_ids=ids))


def test_whole_checkpoint_loads_into_the_base_model(tmp_path):
    """vLLM builds `AutoModel` (our MultimodalModel) and loads the whole checkpoint: the heads outside it are ignored."""
    torch.manual_seed(0)
    config = tiny_config(TOKENIZER, auxiliary_loss_weight=0.5, contrastive_loss_weight=0.5, auxiliary_tasks=["audio_ctc", "media_bow"])
    full = MultimodalForConditionalGeneration(config)
    full.save_pretrained(tmp_path)
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(base, MultimodalModel)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    expected = full.model.state_dict()
    for name, value in base.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_ignored_keys_are_the_heads_a_serving_wrapper_does_not_build():
    """vLLM's Transformers backend drops every checkpoint key that the base model's `_keys_to_ignore_on_load_unexpected`
    matches, then loads `lm_head.weight` into its own LM head: were that key dropped, the head would stay zero and every
    logit equal (greedy decoding then repeats token 1, as it did on the merged tree)."""
    config = tiny_config(TOKENIZER, auxiliary_loss_weight=0.5, contrastive_loss_weight=0.5, auxiliary_tasks=["audio_ctc", "media_bow"])
    keys = MultimodalForConditionalGeneration(config).state_dict()
    patterns = [re.compile(pattern) for pattern in MultimodalModel._keys_to_ignore_on_load_unexpected]
    dropped = {key for key in keys if any(pattern.search(key) for pattern in patterns)}
    assert dropped == {key for key in keys if key.startswith(("auxiliary_heads.", "retrieval_head."))} != set()
    assert "lm_head.weight" in keys and "lm_head.weight" not in dropped


def test_base_model_takes_already_merged_inputs_embeds_without_media():
    """Issue 31 fix 4: vLLM calls the base model with input_ids=None and merged inputs_embeds; a placeholder's
    embedding among them (a generated `<audio>` token) must not be taken for media that were not passed."""
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER)).eval()
    ids = torch.tensor([[20, model.config.audio_token_id, 21]])
    with pytest.raises(ValueError, match="no audio inputs were given"):  # the refusal stays for input_ids
        model.model(input_ids=ids)
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        out = model.model(inputs_embeds=embeds)
        reference = model.model.language_model(inputs_embeds=embeds)
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state)
