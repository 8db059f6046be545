"""transformers' pipelines run on a saved tiny model and processor: `image-text-to-text` (plain inputs and chat
messages with images) and `any-to-any` (audio and video, plain and chat); each answer equals greedy `generate`."""

import numpy as np
import PIL.Image
import pytest
from test_modeling import TOKENIZER, build_model
from media_builders import random_image, tone
from transformers import pipeline

from modeling_multimodal import MultimodalProcessor

IMAGE = PIL.Image.fromarray(random_image(32, 32))
VIDEO = {"frames": np.stack([np.full((16, 16, 3), 8 * k, np.uint8) for k in range(6)]), "fps": 6.0}
NEW_TOKENS = 3
GREEDY = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, model, processor): model and processor saved as a user would, loaded back by the pipeline."""
    folder = tmp_path_factory.mktemp("tiny")
    model = build_model()
    processor = MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), model, processor


def greedy_reply(model, inputs) -> str:
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return TOKENIZER.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_image_text_to_text_with_plain_inputs(saved):
    folder, model, processor = saved
    pipe = pipeline("image-text-to-text", model=folder, processor=folder)
    prompt = "<image> describe the image"
    result = pipe(images=IMAGE, text=prompt, generate_kwargs=GREEDY)
    expected = greedy_reply(model, processor(text=prompt, images=IMAGE))
    assert result[0]["generated_text"].endswith(expected) and expected


def test_image_text_to_text_with_chat_messages(saved):
    folder, model, processor = saved
    pipe = pipeline("image-text-to-text", model=folder, processor=folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "describe the image"}]}]
    result = pipe(text=messages, generate_kwargs=GREEDY)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == greedy_reply(model, inputs).strip()


@pytest.fixture()
def any_to_any(saved, monkeypatch):
    # The pipeline demands torchvision from every model with image or video inputs (transformers' own video
    # processors need it). Ours decodes with PyAV and never imports it, so the test lifts that one check.
    import transformers.pipelines.any_to_any as module

    monkeypatch.setattr(module, "requires_backends", lambda *args, **kwargs: None)
    folder, _, _ = saved
    return pipeline("any-to-any", model=folder, processor=folder)


def test_any_to_any_with_audio_and_video(saved, any_to_any):
    _, model, processor = saved
    prompt = "<audio> <video> what is said in the audio"
    result = any_to_any(
        text=prompt, audio=tone(0.5), videos=VIDEO, processor_kwargs={"sampling_rate": 16000},
        generate_kwargs=GREEDY,
    )
    expected = greedy_reply(model, processor(text=prompt, audio=tone(0.5), videos=VIDEO, sampling_rate=16000))
    assert result[0]["generated_text"].endswith(expected) and expected


def test_any_to_any_with_chat_messages(saved, any_to_any):
    _, model, processor = saved
    content = [
        {"type": "audio", "audio": tone(0.5), "sampling_rate": 16000},
        {"type": "video", "video": VIDEO},
        {"type": "image", "image": IMAGE},
        {"type": "text", "text": "what happens in the video"},
    ]
    messages = [{"role": "user", "content": content}]
    result = any_to_any(text=messages, generate_kwargs=GREEDY)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == greedy_reply(model, inputs).strip()


def test_num_multimodal_tokens_match_what_the_processor_writes(saved):
    _, _, processor = saved
    counts = processor._get_num_multimodal_tokens(image_sizes=[(32, 32), (64, 48)], video_sizes=[(6, 16, 16)], audio_lengths=[8000, 16000])
    out = processor(
        text=["<image> <image> <video>", "<audio> <audio>"], images=[IMAGE, IMAGE], videos=[VIDEO],
        audio=[tone(0.5), tone(1.0)], sampling_rate=16000,
    )
    ids = out["input_ids"]
    assert (ids[0] == processor.media_token_ids["image"]).sum() == sum(counts.num_image_tokens)
    assert (ids[0] == processor.media_token_ids["video"]).sum() == sum(counts.num_video_tokens)
    per_clip = [processor.layout.audio_tokens(int(frames)) for frames in out["input_features_mask"].sum(-1)]
    assert counts.num_audio_tokens == per_clip and (ids[1] == processor.media_token_ids["audio"]).sum() == sum(per_clip)
    assert counts.num_image_patches == [1, 1]
