"""Row-end tokens after each row of an image's pooled grid (`config.image_newline`, LLaVA-NeXT's image_newline)."""

import numpy as np
import PIL.Image
import torch

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.composition import _row_end_from_newline
from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

TOKENIZER = tiny_tokenizer()


def build(**overrides):
    torch.manual_seed(0)
    return MultimodalForConditionalGeneration(tiny_config(TOKENIZER, **overrides)).eval()


def test_layout_counts_one_row_end_per_grid_row():
    for stride, side in ((1, 4), (2, 2)):  # tiny_config: a 4x4 patch grid
        layout = tiny_config(TOKENIZER, image_newline=True, image_pool_stride=stride).token_layout
        assert layout.image_grid_tokens() == side * side and layout.image_tokens() == side * side + side
    assert tiny_config(TOKENIZER, image_pool_stride=2).token_layout.image_tokens() == 4  # off: unchanged


def test_each_row_is_followed_by_the_row_end_vector():
    with_rows, without = build(image_newline=True), build()
    without.load_state_dict(with_rows.state_dict(), strict=False)
    projector = with_rows.model.multi_modal_projector["image"]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, grid = with_rows.model.encode_images(pixels), without.model.encode_images(pixels)
    assert tokens.shape == (2, 20, grid.shape[-1])
    rows = tokens.view(2, 4, 5, -1)
    torch.testing.assert_close(rows[:, :, :4], grid.view(2, 4, 4, -1))  # the grid, row by row, in order
    torch.testing.assert_close(rows[:, :, 4], projector.row_end.detach().expand(2, 4, -1))


def test_processor_placeholders_forward_generate_and_round_trip(tmp_path):
    model = build(image_newline=True)
    processor = MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "a b"}]}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 20
    with torch.no_grad():
        logits = model(**batch).logits
    assert model.generate(**batch, max_new_tokens=3, min_new_tokens=3).shape[1] == batch["input_ids"].shape[1] + 3
    model.save_pretrained(tmp_path)
    reloaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits)


def test_row_end_trains_and_is_touched_with_its_projector():
    model = build(image_newline=True).train()
    projector = model.model.multi_modal_projector["image"]
    words = TOKENIZER("a small red circle", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[model.config.image_token_id] * 20 + words])
    model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss.backward()
    assert projector.row_end.grad is not None and projector.row_end.grad.abs().sum() > 0
    projector.zero_grad()
    (projector.touch(torch.zeros(1)) * 0).backward()  # a batch without images still reaches it (FSDP / DDP)
    assert projector.row_end.grad is not None


def test_composition_starts_the_row_end_at_the_lms_newline_embedding():
    model = build(image_newline=True)

    class OneTokenNewline:
        def __call__(self, text, add_special_tokens=False):
            assert text == "\n"
            return {"input_ids": [7]}

    _row_end_from_newline(model, OneTokenNewline())
    torch.testing.assert_close(model.model.multi_modal_projector["image"].row_end.detach(), model.get_input_embeddings().weight[7].detach())
