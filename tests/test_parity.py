"""Parity with transformers' own classes at identical weights (trust through parity, litgpt-style)."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

TOKENIZER = tiny_tokenizer()


def llava_twin(model: MultimodalForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A LlavaForConditionalGeneration with exactly our vision tower, projector, LM and head weights."""
    config = model.config
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=config.vision_config,
            text_config=config.text_config,
            image_token_index=config.image_token_id,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            projector_hidden_act=config.projector_hidden_act,
        )
    ).eval()
    ours = model.state_dict()
    mapping = {
        "model.multi_modal_projector.": "model.multi_modal_projector.image.",
        "model.vision_tower.": "model.vision_tower.",
        "model.language_model.": "model.language_model.",
        "lm_head.": "lm_head.",
    }
    state = {}
    for name in llava.state_dict():
        prefix = next(p for p in mapping if name.startswith(p))
        state[name] = ours[mapping[prefix] + name[len(prefix) :]]
    llava.load_state_dict(state, strict=True)
    return llava


def test_logits_match_llava_with_the_same_weights():
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, audio=False, video=False)).eval()
    llava = llava_twin(model)
    image_tokens = model.config.token_layout.image_tokens()
    text = TOKENIZER("a small red circle in the top left", add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([[TOKENIZER.bos_token_id] + [model.config.image_token_id] * image_tokens + text] * 2)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=pixel_values).logits
        theirs = llava(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_generation_matches_llava():
    torch.manual_seed(1)
    model = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, audio=False, video=False)).eval()
    llava = llava_twin(model)
    input_ids = torch.tensor([[TOKENIZER.bos_token_id] + [model.config.image_token_id] * 16 + [7, 8]])
    pixel_values = torch.randn(1, 3, 32, 32)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ours = model.generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
    theirs = llava.generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
    assert ours.tolist() == theirs.tolist()
