"""MultimodalProcessor: placeholder expansion, batching, padding, truncation, chat template, save/load, bad inputs."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from media_builders import make_video, random_image, tiny_processor, tone
from transformers import AutoProcessor

from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.configuration import MediaTokenLayout
from modeling_multimodal.configuration.media_tokens import MODALITIES
from modeling_multimodal.processing import MultimodalImageProcessor, MultimodalProcessor, register_processors


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4", num_frames=12, size=(32, 32))


def count(output, processor, kind, sample=None):
    ids = output["input_ids"] if sample is None else output["input_ids"][sample]
    return int((ids == processor.media_token_ids[kind]).sum())


# --- placeholder expansion follows MediaTokenLayout -------------------------------------------------
LAYOUTS = [  # (name, config overrides, expected image / video tokens, computed by hand)
    ("default", {}, 16, 2 * 4),  # grid 4x4; video: 4 frames pooled 2 in time, 2x2 in space -> 2 steps of 2x2
    ("image_pool_2", {"image_pool_stride": 2}, 4, 8),
    ("keep_cls", {"vision_feature_select_strategy": "full"}, 17, 8),
    ("video_no_pool", {"video_spatial_pool_stride": 1}, 16, 2 * 16),
    ("video_no_temporal_pool", {"video_temporal_pool_stride": 1}, 16, 4 * 4),
    ("video_no_pool_at_all", {"video_temporal_pool_stride": 1, "video_spatial_pool_stride": 1}, 16, 64),
    ("audio_pool_1", {"audio_pool_stride": 1}, 16, 8),
    ("audio_pool_3", {"audio_pool_stride": 3}, 16, 8),
]
DURATIONS = [0.01, 0.5, 1.234, 3.0]


@pytest.mark.parametrize("name, overrides, image_tokens, video_tokens", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_placeholders_expand_to_layout_counts(tokenizer, name, overrides, image_tokens, video_tokens):
    config = tiny_config(tokenizer, **overrides)
    processor = MultimodalProcessor.from_config_and_components(config, tokenizer)
    layout = MediaTokenLayout.from_config(config)
    assert (layout.image_tokens(), layout.video_tokens()) == (image_tokens, video_tokens)
    texts = [f"hello <audio> world <image> <video> <image>" for _ in DURATIONS]
    out = processor(
        texts,
        images=[[random_image(40, 30), random_image(32, 32)] for _ in DURATIONS],
        audio=[tone(seconds) for seconds in DURATIONS],
        videos=[np.zeros((5, 16, 16, 3), np.uint8) for _ in DURATIONS],
        sampling_rate=16000,
    )
    frames = out["input_features_mask"].sum(-1).tolist()
    assert frames == [max(int(s * 16000), 400) // 160 for s in DURATIONS]
    for sample, mel_frames in enumerate(frames):
        assert count(out, processor, "image", sample) == 2 * image_tokens
        assert count(out, processor, "video", sample) == video_tokens
        assert count(out, processor, "audio", sample) == layout.audio_tokens(mel_frames)
    assert out["pixel_values"].shape == (8, 3, 32, 32)
    assert out["pixel_values_videos"].shape == (4, 4, 3, 32, 32)


def test_per_sample_and_flat_media_give_the_same_batch(processor):
    images = [random_image(40, 40, seed=s) for s in range(3)]
    texts = ["<image> a red square", "hello", "<image> and <image>"]
    per_sample = processor(texts, images=[[images[0]], [], images[1:]])
    flat = processor(texts, images=images)
    batch_array = processor(texts, images=np.stack(images))  # a 4-D array is a flat batch of images
    for key in per_sample:
        assert torch.equal(per_sample[key], flat[key]) and torch.equal(batch_array[key], flat[key])
    # placeholder order: sample 0's image first
    assert torch.equal(flat["pixel_values"][0], processor("<image>", images=images[0])["pixel_values"][0])


def test_all_modalities_in_one_batch(processor, mp4):
    out = processor(
        ["<video> describe the video", "<image> <audio> what is in this picture?"],
        images=[None, [PIL.Image.fromarray(random_image(50, 40))]],
        audio=[None, [tone(1.0, 44100)]],
        videos=[[str(mp4)], None],
        sampling_rate=44100,
        return_metadata=True,
    )
    expected = {
        "input_ids": 2, "attention_mask": 2, "pixel_values": 4, "input_features": 3, "input_features_mask": 2,
        "pixel_values_videos": 5,
    }
    assert {k: v.ndim for k, v in out.items() if k != "video_metadata"} == expected
    assert out["pixel_values_videos"].dtype == torch.float32 and out["pixel_values_videos"].shape[:2] == (1, 4)
    assert out["video_metadata"][0].frames_indices == [1, 4, 7, 10]
    assert out["video_metadata"][0].timestamps == pytest.approx([0.1, 0.4, 0.7, 1.0])
    assert "video_metadata" not in processor("<video>", videos=str(mp4))  # only on request


def test_padding_side_and_decode(processor):
    texts = ["hello world", "<image> what is in this picture?"]
    images = [random_image(32, 32)]
    right = processor(texts, images=images)
    left = processor(texts, images=images, padding_side="left")
    assert right["attention_mask"][0, -1] == 0 and left["attention_mask"][0, 0] == 0
    for sample in range(2):
        real_right = right["input_ids"][sample][right["attention_mask"][sample].bool()]
        real_left = left["input_ids"][sample][left["attention_mask"][sample].bool()]
        assert torch.equal(real_right, real_left)
    assert processor.decode(right["input_ids"][0], skip_special_tokens=True) == "hello world"
    assert processor.batch_decode(left["input_ids"], skip_special_tokens=True)[1] == "what is in this picture?"


def test_truncation_never_cuts_media(processor):
    image = random_image(32, 32)
    text = "<image> what is in this picture? a red square on white"
    full = processor(text, images=image)["input_ids"].shape[1]
    cut = processor(text, images=image, truncation=True, max_length=20)
    assert cut["input_ids"].shape[1] == 20 and count(cut, processor, "image") == 16  # text after the image is cut
    with pytest.raises(ValueError, match=r"sample 1 has .* media tokens at positions 3..18; truncating to max_length=10"):
        processor(["hello", "a red square <image> tail"], images=image, truncation=True, max_length=10)
    assert full > 20


def test_left_truncation_keeps_media_at_the_end(tokenizer):
    processor = tiny_processor(tokenizer)
    processor.tokenizer.truncation_side = "left"
    try:
        out = processor("what is in this picture? a red square <image>", images=random_image(32, 32), truncation=True, max_length=17)
        assert out["input_ids"].shape[1] == 17 and count(out, processor, "image") == 16
    finally:
        processor.tokenizer.truncation_side = "right"


def test_numpy_output(processor):
    out = processor(["<image> hello"], images=random_image(32, 32), return_tensors="np")
    assert isinstance(out["input_ids"], np.ndarray) and out["pixel_values"].dtype == np.float32


def test_bpe_tokenizer_expands_the_same_counts():
    tokenizer = tiny_tokenizer("bpe")
    processor = MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer)
    out = processor("hello<image>world <audio>", images=random_image(32, 32), audio=tone(1.0), sampling_rate=16000)
    assert count(out, processor, "image") == 16 and count(out, processor, "audio") == 25


# --- chat ---------------------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "describe the picture"},
    {"role": "user", "content": [{"type": "image", "image": random_image(40, 40)}, {"type": "text", "text": "what is in this picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
    {"role": "user", "content": [{"type": "audio", "audio": tone(0.5), "sampling_rate": 16000}, {"type": "text", "text": "and the audio?"}]},
    {"role": "assistant", "content": "hello world"},
]


def test_chat_template_renders(processor):
    rendered = processor.apply_chat_template(CONVERSATION)
    assert rendered == (
        "system: describe the picture</s>\nuser: <image> what is in this picture?</s>\nassistant: a red square</s>\n"
        "user: <audio> and the audio?</s>\nassistant: hello world</s>\n"
    )
    prompt = processor.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt.endswith("what is in this picture?</s>\nassistant:")
    assert processor.apply_chat_template([CONVERSATION[:2], CONVERSATION[:3]])[0] == prompt.removesuffix("assistant:")


def test_system_prompt_is_put_first_and_saved(tokenizer, tmp_path):
    processor = MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer, system_prompt="be brief")
    without_system = CONVERSATION[1:3]
    assert processor.apply_chat_template(without_system).startswith("system: be brief</s>\nuser: <image>")
    assert processor.apply_chat_template(CONVERSATION) == MultimodalProcessor.from_config_and_components(
        tiny_config(tokenizer), tokenizer
    ).apply_chat_template(CONVERSATION)  # a conversation's own system turn wins
    out = processor.apply_chat_template(without_system, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert processor.decode(out["input_ids"][0][out["assistant_masks"][0].bool()]) == "a red square </s>"
    processor.save_pretrained(tmp_path)
    reloaded = MultimodalProcessor.from_pretrained(tmp_path)
    assert reloaded.system_prompt == "be brief"
    assert reloaded.apply_chat_template(without_system) == processor.apply_chat_template(without_system)
    with pytest.raises(ValueError, match="system_prompt must be a string"):
        MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer, system_prompt=["be brief"])


def test_chat_tokenized_with_assistant_mask(processor):
    out = processor.apply_chat_template(
        [CONVERSATION, CONVERSATION[:3]], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, padding_side="left"
    )
    assert out["pixel_values"].shape[0] == 2 and out["input_features"].shape[0] == 1
    replies = [
        processor.decode(out["input_ids"][sample][out["assistant_masks"][sample].bool()]) for sample in range(2)
    ]
    assert replies == ["a red square </s> hello world </s>", "a red square </s>"]
    assert (out["assistant_masks"] <= out["attention_mask"]).all()
    # tokenizing the rendered text yourself gives the same ids
    texts = processor.apply_chat_template([CONVERSATION])
    direct = processor(texts, images=[CONVERSATION[1]["content"][0]["image"]], audio=tone(0.5), sampling_rate=16000)
    assert torch.equal(direct["input_ids"], out["input_ids"][:1])


def test_drop_trailing_turns(processor):
    full = processor.apply_chat_template(CONVERSATION, tokenize=True).shape[1]
    first_two_turns = processor.apply_chat_template(CONVERSATION[:3], tokenize=True).shape[1]
    out = processor.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, truncation=True, max_length=first_two_turns + 1, drop_trailing_turns=True
    )
    assert out["input_ids"].shape[1] == first_two_turns < full and "input_features" not in out
    with pytest.raises(ValueError, match="would cut a media span"):
        processor.apply_chat_template(CONVERSATION, tokenize=True, truncation=True, max_length=first_two_turns + 1)
    with pytest.raises(ValueError, match="conversation 0: its first turn alone takes"):
        processor.apply_chat_template(CONVERSATION, tokenize=True, truncation=True, max_length=5, drop_trailing_turns=True)



def test_drop_trailing_turns_decodes_the_media_once(tokenizer, monkeypatch):
    """Each dropped turn is measured from the first pass's placeholder expansions, not by processing the media
    again; the kept conversation equals the one processed without dropping."""
    processor = MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer)
    turns = [{"role": "system", "content": "describe the picture"}]
    for answer in ("a red square", "a blue circle", "a green star"):
        turns += [
            {"role": "user", "content": [{"type": "image", "image": random_image(40, 40)}, {"type": "text", "text": "and this?"}]},
            {"role": "assistant", "content": answer},
        ]
    expected = processor.apply_chat_template(turns[:5], tokenize=True, return_dict=True)
    calls = []
    process_images = processor._process_images
    monkeypatch.setattr(processor, "_process_images", lambda *a, **k: calls.append(1) or process_images(*a, **k))
    out = processor.apply_chat_template(
        turns, tokenize=True, return_dict=True, truncation=True, max_length=expected["input_ids"].shape[1],
        drop_trailing_turns=True,
    )  # fmt: skip
    assert len(calls) == 2  # once to measure the whole conversation, once for the kept turns
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["pixel_values"], expected["pixel_values"])

# --- save / load ---------------------------------------------------------------------------------------
def test_save_load_round_trip_and_auto_processor(processor, tmp_path, mp4):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["token_layout"] == processor.layout.to_dict()
    register_processors()
    for loaded in (MultimodalProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is MultimodalProcessor and loaded.layout == processor.layout
        assert loaded.chat_template == processor.chat_template
        assert loaded.apply_chat_template(CONVERSATION) == processor.apply_chat_template(CONVERSATION)
        inputs = dict(text=["<image> <video>", "<audio> hello"], images=random_image(40, 30), videos=str(mp4))
        inputs.update(audio=tone(0.7), sampling_rate=16000)
        expected, result = processor(**inputs), loaded(**inputs)
        assert expected.keys() == result.keys()
        assert all(torch.equal(expected[key], result[key]) for key in expected)


def test_auto_image_processor_resolves(processor, tmp_path):
    from transformers import AutoImageProcessor

    register_processors()
    processor.image_processor.save_pretrained(tmp_path)
    tiny_config(processor.tokenizer).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is MultimodalImageProcessor


def test_from_config_checks_components(tokenizer):
    config = tiny_config(tokenizer)
    with pytest.raises(ValueError, match="image_processor outputs 224x224 but vision_config.image_size=32"):
        MultimodalProcessor.from_config_and_components(config, tokenizer, image_processor=MultimodalImageProcessor())
    config.image_token_id = tokenizer.convert_tokens_to_ids("hello")
    with pytest.raises(ValueError, match=r"maps '<image>' to \d+ but config.image_token_id="):
        MultimodalProcessor.from_config_and_components(config, tokenizer)


# (config options, modalities, absent sub-processors, media the model refuses and the tower named)
ABSENT_TOWER_CASES = [
    ("image_only", dict(audio=False), ["image", "video"], ["feature_extractor"], "audio", "audio tower"),
    ("audio_only", dict(vision=False), ["audio"], ["image_processor", "video_processor"], "image", "vision tower"),
]


@pytest.mark.parametrize("name, options, modalities, absent, refused, tower", ABSENT_TOWER_CASES, ids=[c[0] for c in ABSENT_TOWER_CASES])
def test_model_without_a_tower(tokenizer, tmp_path, name, options, modalities, absent, refused, tower):
    """A model without a tower carries no sub-processor for its media, still saves and loads, answers `None` for
    those media's token counts (vLLM's probe), works for text alone, and refuses the media naming the tower."""
    processor = MultimodalProcessor.from_config_and_components(tiny_config(tokenizer, **options), tokenizer)
    assert processor.supported_modalities == modalities
    assert all(not hasattr(processor, component) for component in absent)
    assert processor.get_attributes() == ["tokenizer", *(c for c in ("image_processor", "feature_extractor", "video_processor") if c not in absent)]
    text_only = processor(["hello world", "hello"])
    assert text_only["input_ids"].shape == (2, 2) and set(text_only) == {"input_ids", "attention_mask"}

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert all(component not in saved for component in absent)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.get_attributes() == processor.get_attributes() and loaded.token_layout == processor.token_layout
    assert torch.equal(loaded(["hello world", "hello"])["input_ids"], text_only["input_ids"])

    counts = processor._get_num_multimodal_tokens(image_sizes=[(32, 32)], video_sizes=[(4, 32, 32)], audio_lengths=[16000])
    assert {kind: getattr(counts, f"num_{kind}_tokens", None) is not None for kind in MODALITIES} == {
        kind: kind in modalities for kind in MODALITIES
    }
    media = {"image": dict(images=random_image(32, 32)), "audio": dict(audio=tone(1.0), sampling_rate=16000)}[refused]
    with pytest.raises(ValueError, match=f"this model has no {tower}, so it takes no {refused}.* inputs were given"):
        processor(f"<{refused}>", **media)
    with pytest.raises(ValueError, match=f"this model has no {tower}, .* sample 0 contains <{refused}>"):
        processor(f"<{refused}> hello")


def test_audio_only_model_processes_audio_and_agrees_with_the_model(tokenizer):
    """An LM + audio encoder without a vision tower (the Qwen2-Audio shape): audio expands to the model's counts."""
    from modeling_multimodal import MultimodalForConditionalGeneration

    config = tiny_config(tokenizer, vision=False)
    processor = MultimodalProcessor.from_config_and_components(config, tokenizer)
    batch = processor(["<audio> hello", "hello <audio>"], audio=[tone(1.0), tone(0.5)], sampling_rate=16000)
    layout = MediaTokenLayout.from_config(config)
    expected = [layout.audio_tokens(n) for n in batch["input_features_mask"].sum(-1).tolist()]
    assert [count(batch, processor, "audio", sample) for sample in range(2)] == expected
    model = MultimodalForConditionalGeneration(config).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape


# --- bad inputs: one line per case ---------------------------------------------------------------------
def _write(tmp, name, data):
    path = tmp / name
    path.write_bytes(data)
    return str(path)


def _zeroed_mp4(tmp):
    """A valid container whose every video packet is zeros: nothing decodes."""
    data = bytearray(make_video(tmp / "ok.mp4", codec="mpeg4", num_frames=5).read_bytes())
    start = data.find(b"mdat")
    size = int.from_bytes(data[start - 4 : start], "big")
    data[start + 4 : start - 4 + size] = bytes(size - 8)
    return _write(tmp, "zeroed.mp4", bytes(data))


IMG = random_image(32, 32)
BAD_INPUTS = [  # (name, build the call's arguments from a tmp dir, error pattern)
    ("more_placeholders_than_images", lambda t: dict(text="<image> <image>", images=[IMG]), r"has 2 <image> placeholder\(s\) .* but 1 image"),
    ("fewer_placeholders_than_images", lambda t: dict(text="<image>", images=[IMG, IMG]), r"has 1 <image> placeholder\(s\) .* but 2 image"),
    ("placeholder_without_media", lambda t: dict(text=["hello", "<video>"]), r"sample 1 has 1 <video> placeholder\(s\) but no video"),
    ("per_sample_count_mismatch", lambda t: dict(text=["<image>", "<image>"], images=[[IMG], []]), r"sample 1 has 1 <image> placeholder\(s\) but 0 image"),
    ("mismatched_batch_lengths", lambda t: dict(text=["<image>"] * 3, images=[[IMG], [IMG]]), r"mismatched batch lengths: 3 texts but 2 lists of images"),
    ("unknown_image_type", lambda t: dict(text="<image>", images=[object()]), r"sample 0, image 0 \(object\): unsupported image type object"),
    ("unknown_chat_content_type", lambda t: dict(chat=[{"role": "user", "content": [{"type": "pdf", "pdf": "x"}]}]), r"conversation 0, message 0: unknown content type 'pdf'"),
    ("missing_image_file", lambda t: dict(text="<image>", images=str(t / "nope.png")), r"sample 0, image 0 \(file '.*nope.png'\): .* does not exist"),
    ("corrupt_image_file", lambda t: dict(text="hi <image>", images=_write(t, "bad.png", b"\x89PNG garbage" * 10)), r"sample 0, image 0 \(file '.*bad.png'\): cannot read"),
    ("truncated_image_file", lambda t: dict(text="<image>", images=_write(t, "cut.jpg", _jpeg()[:200])), r"file '.*cut.jpg'.*cannot read"),
    ("image_over_pixel_limit", lambda t: dict(text="<image>", images=random_image(100, 100), images_kwargs={"max_image_pixels": 999}), r"sample 0, image 0 .* above max_image_pixels=999"),
    ("float_image_out_of_range", lambda t: dict(text="<image>", images=np.full((8, 8, 3), 2.5, np.float32)), r"float pixel values must be in \[0, 1\]"),
    ("image_with_5_channels", lambda t: dict(text="<image>", images=np.zeros((8, 8, 5), np.uint8)), r"expected \(H, W, C\) or \(C, H, W\) with C in 1..4"),
    ("corrupt_audio_file", lambda t: dict(text="<audio>", audio=_write(t, "bad.wav", b"RIFF" + bytes(40))), r"sample 0, audio 0 \(file '.*bad.wav'\): cannot decode"),
    ("empty_audio", lambda t: dict(text="<audio>", audio=np.zeros(0, np.float32), sampling_rate=16000), r"sample 0, audio 0 .*: the audio is empty"),
    ("nan_audio", lambda t: dict(text=["hi", "<audio>"], audio=np.array([0.1, np.nan] * 500, np.float32), sampling_rate=16000), r"sample 1, audio 0 .*NaN"),
    ("audio_without_sampling_rate", lambda t: dict(text="<audio>", audio=tone(0.5)), r"without a sampling rate; pass sampling_rate="),
    ("fractional_sampling_rate", lambda t: dict(text="<audio>", audio=tone(0.5), sampling_rate=22050.5), r"sampling_rate=22050.5 cannot be resampled"),
    ("zero_sampling_rate", lambda t: dict(text="<audio>", audio={"array": tone(0.5), "sampling_rate": 0}), r"sampling_rate=0 cannot be resampled"),
    ("audio_too_long", lambda t: dict(text="<audio>", audio=tone(30.5), sampling_rate=16000), r"lasts 30.50 s \(3050 mel frames\)"),
    ("audio_given_as_list_of_floats", lambda t: dict(text="<audio>", audio=[[[0.1, 0.2]]], sampling_rate=16000), r"unsupported audio type list"),
    ("corrupt_video_file", lambda t: dict(text="<video>", videos=_write(t, "bad.mp4", b"\x00\x00\x00\x18ftypmp42" + bytes(500))), r"sample 0, video 0 \(file '.*bad.mp4'\): cannot decode"),
    ("video_with_zero_decodable_frames", lambda t: dict(text="<video>", videos=_zeroed_mp4(t)), r"file '.*zeroed.mp4'\): .* has zero decodable video frames"),
    ("video_without_video_stream", lambda t: dict(text="<video>", videos=_wav(t)), r"has no video stream"),
    ("empty_frame_array", lambda t: dict(text="<video>", videos=np.zeros((0, 8, 8, 3), np.uint8)), r"sample 0, video 0 .*: the video has zero frames"),
    ("video_array_wrong_rank", lambda t: dict(text="<video>", videos=np.zeros((8, 8, 3), np.uint8)), r"a video array must be 4-D"),
    ("media_span_cut_by_truncation", lambda t: dict(text="a red square <image>", images=IMG, truncation=True, max_length=8), r"sample 0 .* would cut a media span"),
    ("num_frames_disagrees_with_layout", lambda t: dict(text="<video>", videos=np.zeros((4, 8, 8, 3), np.uint8), videos_kwargs={"num_frames": 2}), r"the model takes exactly 4 frames"),
]


def _jpeg():
    import io

    buffer = io.BytesIO()
    PIL.Image.fromarray(random_image(64, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _wav(tmp):
    import soundfile

    path = tmp / "sound.wav"
    soundfile.write(path, tone(0.2), 16000)
    return str(path)


@pytest.fixture(scope="module")
def reference_output(processor):
    return processor(["<image> hello", "<audio>"], images=IMG, audio=tone(0.3), sampling_rate=16000)


@pytest.mark.parametrize("name, make_arguments, pattern", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(processor, reference_output, tmp_path, name, make_arguments, pattern):
    arguments = make_arguments(tmp_path)
    with pytest.raises((ValueError, TypeError), match=pattern):
        if "chat" in arguments:
            processor.apply_chat_template(arguments["chat"], tokenize=True)
        else:
            processor(**arguments)
    # nothing was left half-done: the processor still gives the same result
    again = processor(["<image> hello", "<audio>"], images=IMG, audio=tone(0.3), sampling_rate=16000)
    assert all(torch.equal(again[key], reference_output[key]) for key in reference_output)
