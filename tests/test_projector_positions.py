"""Learned position embeddings on projected image and video tokens (`config.projector_position_embeddings`)."""

import pytest
import torch

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.projectors import MultiModalProjector
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
# tiny_config: 4x4 patch grid; images pooled by 2 -> 4 tokens; video frames pooled 2x2 -> 4 tokens per time step.
OPTIONS = dict(projector_position_embeddings=True, image_pool_stride=2, video_projector="image")


def build(**overrides):
    torch.manual_seed(0)
    return MultimodalForConditionalGeneration(tiny_config(TOKENIZER, **overrides)).eval()


def test_row_i_is_added_to_token_i_of_every_group():
    projector = MultiModalProjector(8, 6, num_positions=4)
    with torch.no_grad():
        projector.position_embedding.copy_(torch.arange(24.0).view(4, 6))
    features = torch.randn(2, 12, 8)  # three groups of four tokens per item
    plain = MultiModalProjector(8, 6)
    plain.load_state_dict({k: v for k, v in projector.state_dict().items() if k != "position_embedding"})
    expected = plain(features) + projector.position_embedding.repeat(3, 1)
    torch.testing.assert_close(projector(features), expected)
    with pytest.raises(ValueError, match="4 position embeddings per group of tokens, but got 6 tokens"):
        projector(torch.randn(1, 6, 8))


def test_zero_at_start_so_outputs_equal_a_model_without_them():
    with_positions, without = build(**OPTIONS), build(**{**OPTIONS, "projector_position_embeddings": False})
    image_projector = with_positions.model.multi_modal_projector["image"]
    assert image_projector.num_positions == 4 and not image_projector.position_embedding.any()
    assert with_positions.model.video_projector is image_projector  # shared: frames read the same table
    without.load_state_dict(with_positions.state_dict(), strict=False)
    pixels, video = torch.randn(2, 3, 32, 32), torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(with_positions.model.encode_images(pixels), without.model.encode_images(pixels))
        torch.testing.assert_close(with_positions.model.encode_videos(video), without.model.encode_videos(video))


def test_each_video_time_step_gets_the_table():
    model = build(**{**OPTIONS, "video_projector": "mlp"})
    projector = model.model.multi_modal_projector["video"]
    assert projector.num_positions == model.config.token_layout.video_tokens_per_step() == 4
    video = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        before = model.model.encode_videos(video)
        projector.position_embedding.normal_()
        after = model.model.encode_videos(video)
    table = projector.position_embedding.detach()
    torch.testing.assert_close(after - before, table.repeat(2, 1)[None])  # 2 time steps of 4 tokens


def test_trained_and_saved(tmp_path):
    model = build(**OPTIONS).train()
    words = TOKENIZER("a small red circle", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[model.config.image_token_id] * 4 + words])
    loss = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss
    loss.backward()
    table = model.model.multi_modal_projector["image"].position_embedding
    assert table.grad is not None and table.grad.abs().sum() > 0
    with torch.no_grad():
        table.normal_()
    model.save_pretrained(tmp_path)
    reloaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.model.multi_modal_projector["image"].position_embedding, table.detach())


def test_shared_projector_needs_equal_grids():
    with pytest.raises(ValueError, match="a frame has 4 tokens and an image 16"):
        tiny_config(TOKENIZER, projector_position_embeddings=True, video_projector="image")
