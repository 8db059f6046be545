"""MultimodalProcessor behaves as transformers 5.24's processors do: `ProcessingKwargs` routing (flat and grouped,
tokenizer init defaults), `from_pretrained(dir, **component_options)`, `apply_chat_template`'s return types and
arguments, and the tokenizer's own chat template (ChatML) with media placeholders and assistant masks."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from media_builders import random_image, tiny_processor, tone

from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.processing import DEFAULT_CHAT_TEMPLATE, MultimodalProcessor

IMAGE = random_image(40, 40)
VIDEO = {"frames": np.stack([np.full((16, 16, 3), 8 * k, np.uint8) for k in range(6)]), "fps": 6.0}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "what is in this picture?"}]},
    {"role": "assistant", "content": "a red square"},
    {"role": "user", "content": [{"type": "audio", "audio": tone(0.5), "sampling_rate": 16000}, {"type": "text", "text": "and the audio?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "hello world"}]},
]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def chatml_processor(chat_template=None):
    """A byte-level tokenizer that carries its own ChatML template, as SmolLM2's and Qwen's do."""
    tokenizer = tiny_tokenizer("bpe")
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHATML
    return MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer, chat_template=chat_template)


# --- ProcessingKwargs ---------------------------------------------------------------------------------
ROUTING_CASES = [
    # (name, flat kwargs, the same grouped)
    # a flat option reaches every component that takes it (here the image and the video processor)
    ("image_option", dict(do_rescale=False), dict(images_kwargs={"do_rescale": False}, videos_kwargs={"do_rescale": False})),
    ("text_option", dict(padding="max_length", max_length=100), dict(text_kwargs={"padding": "max_length", "max_length": 100})),
    ("audio_option", dict(sampling_rate=16000), dict(audio_kwargs={"sampling_rate": 16000})),
    ("video_option", dict(do_sample_frames=True, fps=2.0), dict(videos_kwargs={"do_sample_frames": True, "fps": 2.0})),
    ("common_option", dict(return_tensors="np"), dict(common_kwargs={"return_tensors": "np"})),
]


@pytest.mark.parametrize("name,flat,grouped", ROUTING_CASES, ids=[c[0] for c in ROUTING_CASES])
def test_flat_and_grouped_kwargs_route_alike(processor, name, flat, grouped):
    call = dict(text=["<image> <video> hello", "<audio>"], images=IMAGE, videos=VIDEO, audio=tone(0.4))
    defaults = {"sampling_rate": 16000} if "sampling_rate" not in flat else {}
    from_flat, from_grouped = processor(**call, **defaults, **flat), processor(**call, **defaults, **grouped)
    assert from_flat.keys() == from_grouped.keys()
    for key in from_flat:
        np.testing.assert_array_equal(np.asarray(from_flat[key]), np.asarray(from_grouped[key]), err_msg=key)
    if name == "image_option":  # reached the image processor: pixels are no longer rescaled to [0, 1] first
        plain = processor(**call, **defaults)
        assert not torch.allclose(from_flat["pixel_values"], plain["pixel_values"])
    if name == "text_option":
        assert from_flat["input_ids"].shape[1] == 100
    if name == "common_option":
        assert isinstance(from_flat["input_ids"], np.ndarray)


def test_tokenizer_init_defaults_are_honoured():
    tokenizer = tiny_tokenizer()
    tokenizer.init_kwargs["padding_side"] = "left"
    tokenizer.padding_side = "left"
    processor = MultimodalProcessor.from_config_and_components(tiny_config(tokenizer), tokenizer)
    out = processor(["hello", "hello world hello world"])
    assert out["attention_mask"][0].tolist()[0] == 0 and out["attention_mask"][0].tolist()[-1] == 1
    assert processor(["hello", "hello world hello world"], padding_side="right")["attention_mask"][0].tolist()[0] == 1


def test_from_pretrained_passes_component_options(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    plain = MultimodalProcessor.from_pretrained(tmp_path)
    loaded = MultimodalProcessor.from_pretrained(tmp_path, do_normalize=False, num_frames=4)
    assert plain.image_processor.do_normalize and not loaded.image_processor.do_normalize
    assert not loaded.video_processor.do_normalize
    pixels = loaded("<image>", images=IMAGE)["pixel_values"]
    assert pixels.min() >= 0 and pixels.max() <= 1  # rescaled, not normalised


# --- apply_chat_template --------------------------------------------------------------------------------
def test_tokenize_returns_ids_unless_return_dict(processor):
    ids = processor.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=True)
    full = processor.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert isinstance(ids, torch.Tensor) and torch.equal(ids, full["input_ids"])
    assert "pixel_values" in full
    as_numpy = processor.apply_chat_template(CONVERSATION[:1], tokenize=True, return_dict=True, return_tensors="np")
    assert isinstance(as_numpy["input_ids"], np.ndarray)
    left = processor.apply_chat_template(
        [CONVERSATION[:1], CONVERSATION[:2]], tokenize=True, return_dict=True, processor_kwargs={"padding_side": "left"}
    )
    assert left["attention_mask"][0, 0] == 0


def test_continue_final_message_tools_and_template_variables(processor):
    partial = CONVERSATION[:1] + [{"role": "assistant", "content": "a red"}]
    continued = processor.apply_chat_template(partial, continue_final_message=True)
    assert continued.endswith("assistant: a red")
    template = "{% for tool in tools %}[{{ tool.name }}]{% endfor %}{{ greeting }}" + DEFAULT_CHAT_TEMPLATE
    rendered = processor.apply_chat_template(CONVERSATION[:1], chat_template=template, tools=[{"name": "zoom"}], greeting="hi ")
    assert rendered.startswith("[zoom]hi user: <image> what is in this picture?")
    with pytest.raises(ValueError, match="continue_final_message cannot be combined"):
        processor.apply_chat_template(partial, continue_final_message=True, add_generation_prompt=True)


def test_message_objects_render_as_dicts(processor):
    @dataclass
    class Message:
        role: str
        content: str

    assert processor.apply_chat_template([Message("user", "hello")]) == processor.apply_chat_template(
        [{"role": "user", "content": "hello"}]
    )


# --- the tokenizer's own chat template -----------------------------------------------------------------------
def test_tokenizer_chat_template_is_kept_with_media_placeholders():
    processor = chatml_processor()
    assert processor.chat_template.endswith(CHATML)  # kept, after the prelude that writes media parts
    prompt = processor.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image> what is in this picture?<|im_end|>\n<|im_start|>assistant\n"
    assert chatml_processor(chat_template=DEFAULT_CHAT_TEMPLATE).chat_template == DEFAULT_CHAT_TEMPLATE
    assert tiny_processor().chat_template == DEFAULT_CHAT_TEMPLATE  # a tokenizer without a template


@pytest.mark.parametrize("template", ["chatml", "default"])
def test_assistant_mask_marks_each_reply_and_its_end_of_turn(template):
    processor = chatml_processor(chat_template=None if template == "chatml" else DEFAULT_CHAT_TEMPLATE)
    out = processor.apply_chat_template(
        [CONVERSATION, CONVERSATION[:2]], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    end = "<|im_end|>" if template == "chatml" else "</s>"
    replies = [processor.decode(out["input_ids"][i][out["assistant_masks"][i].bool()]) for i in range(2)]
    if template == "chatml":
        assert replies == [f"a red square{end}hello world{end}", f"a red square{end}"]
    else:
        assert replies == [f" a red square{end} hello world{end}", f" a red square{end}"]
    assert (out["assistant_masks"] <= out["attention_mask"]).all()


def test_assistant_mask_refuses_a_template_that_is_not_prefix_stable():
    # A template that writes the number of messages first: an earlier turn renders differently in a longer chat.
    template = "{{ messages | length }}" + CHATML
    processor = chatml_processor(chat_template=template)
    with pytest.raises(ValueError, match="conversation 0, message 1: the chat template does not render"):
        processor.apply_chat_template(CONVERSATION[:2], tokenize=True, return_assistant_tokens_mask=True)


def test_a_template_that_reads_content_items_gets_them(processor):
    """VLM-style templates iterate over typed items (transformers' common test); string templates get the flat text."""
    template = (
        "{% for message in messages %}{{ message.role }}:"
        "{% for block in message.content %} {{ block.type }}={{ block.url or block.text }}{% endfor %}{% endfor %}"
    )
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}}, {"type": "text", "text": "what is this?"}]}]
    assert processor.apply_chat_template(messages, chat_template=template) == "user: image=cat.png text=what is this?"
    assert chatml_processor().apply_chat_template(messages) == "<|im_start|>user\n<image> what is this?<|im_end|>\n"


def test_unknown_kwargs_are_warned_about_and_ignored(processor):
    """As transformers' processors (pipelines pass options meant for other components): the output is the same."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    plain = processor(text="<image> hello", images=IMAGE)
    with CaptureLogger(logging.get_logger("modeling_multimodal.processing.processing_multimodal")) as captured:
        with_unknown = processor(text="<image> hello", images=IMAGE, colour="red", text_kwargs={"padding": True})
    assert "['colour']" in captured.out and "ignored" in captured.out
    assert set(with_unknown) == set(plain)
    for key in plain:
        torch.testing.assert_close(with_unknown[key], plain[key], rtol=0, atol=0)


def test_raw_audio_without_sampling_rate_is_an_error_not_a_guess(processor):
    """transformers' Whisper feature extractor warns and assumes its own rate; a clip recorded at another rate then
    gives silently wrong features (a 44.1 kHz clip read as 16 kHz is 2.8 times too long and pitched down), so a raw
    array without a rate is refused. Files, bytes and {"array", "sampling_rate"} dicts carry their rate."""
    with pytest.raises(ValueError, match="without a sampling rate; pass sampling_rate="):
        processor(text="<audio>", audio=tone(0.5))
    given = processor(text="<audio>", audio=tone(0.5), sampling_rate=16000)
    as_dict = processor(text="<audio>", audio={"array": tone(0.5), "sampling_rate": 16000})
    torch.testing.assert_close(as_dict["input_features"], given["input_features"], rtol=0, atol=0)


def test_first_base_has_processor_mixins_interface(processor):
    """transformers' processor tests read `replace_image_token` & co. on the processor's first base class."""
    from transformers.processing_utils import ProcessorMixin

    base = type(processor).__mro__[1]
    assert issubclass(base, ProcessorMixin) and hasattr(base, "replace_image_token") and hasattr(base, "replace_audio_token")
    assert type(processor).apply_chat_template is base.apply_chat_template  # ours, not ProcessorMixin's


def test_chat_audio_by_path_and_sampling_rate_reach_the_call(processor, tmp_path):
    """An audio file item with its own "sampling_rate" is read from the file (its header's rate); a call's
    `sampling_rate=` reaches `__call__` for raw arrays in the messages."""
    import soundfile

    path = tmp_path / "clip.wav"
    soundfile.write(path, tone(0.5, sampling_rate=8000), 8000)
    chat = lambda audio, **item: [{"role": "user", "content": [{"type": "audio", "audio": audio, **item}]}]  # noqa: E731
    by_path = processor.apply_chat_template(chat(str(path), sampling_rate=8000), tokenize=True, return_dict=True)
    direct = processor(text="user: <audio></s>\n", audio=str(path))
    torch.testing.assert_close(by_path["input_features"], direct["input_features"], rtol=0, atol=0)
    by_call = processor.apply_chat_template(chat(tone(0.5, sampling_rate=8000)), tokenize=True, return_dict=True, sampling_rate=8000)
    array = processor(text="user: <audio></s>\n", audio=tone(0.5, sampling_rate=8000), sampling_rate=8000)
    torch.testing.assert_close(by_call["input_features"], array["input_features"], rtol=0, atol=0)


def test_raw_audio_at_the_feature_extractors_rate_when_the_caller_says_so(processor, tmp_path):
    """vLLM resamples audio to the feature extractor's rate and passes arrays without `sampling_rate`, as `audio=`
    (lmms-eval: `audios=`): `audio_at_feature_rate=True`, in the call or saved on the processor, accepts them."""
    expected = processor(text="<audio>", audio=tone(0.5), sampling_rate=16000)
    in_call = processor(text="<audio>", audio=[tone(0.5)], audio_at_feature_rate=True)
    as_audios = processor(text="<audio>", audios=[tone(0.5)], audio_at_feature_rate=True)
    processor.save_pretrained(tmp_path)
    loaded = MultimodalProcessor.from_pretrained(tmp_path, audio_at_feature_rate=True)
    for out in (in_call, as_audios, loaded(text="<audio>", audio=[tone(0.5)])):
        torch.testing.assert_close(out["input_features"], expected["input_features"], rtol=0, atol=0)
    assert MultimodalProcessor.from_pretrained(tmp_path).audio_at_feature_rate is False
    with pytest.raises(ValueError, match="without a sampling rate"):
        processor(text="<audio>", audio=[tone(0.5)])


def test_video_arrays_need_no_metadata_and_take_vllms(processor):
    """The video processor asks for no metadata (`do_sample_frames=False`: vLLM requires metadata otherwise); frame
    arrays are sampled uniformly, and `video_metadata` (one dict per video, as vLLM passes) gives them their rate."""
    frames = VIDEO["frames"]
    assert processor.video_processor.do_sample_frames is False
    plain = processor(text="<video>", videos=[frames], return_metadata=True)
    as_dict = processor(text="<video>", videos=[{"frames": frames, "fps": 6.0}], return_metadata=True)
    torch.testing.assert_close(plain["pixel_values_videos"], as_dict["pixel_values_videos"], rtol=0, atol=0)
    meta = {"fps": 6.0, "duration": 1.0, "total_num_frames": 6, "frames_indices": list(range(6)), "video_backend": "opencv"}
    vllm = processor(text="<video>", videos=[frames], video_metadata=[meta], do_sample_frames=False, return_metadata=True)
    torch.testing.assert_close(vllm["pixel_values_videos"], as_dict["pixel_values_videos"], rtol=0, atol=0)
    assert vllm["video_metadata"][0].fps == 6.0 and plain["video_metadata"][0].fps is None
    with pytest.raises(ValueError, match="video_metadata has 2 entries for 1 videos"):
        processor(text="<video>", videos=[frames], video_metadata=[meta, meta])


def test_mm_token_type_ids_mark_each_modality(processor):
    out = processor(text=["<image> hi <audio>"], images=IMAGE, audio=tone(0.5), sampling_rate=16000, return_mm_token_type_ids=True)
    ids, types = out["input_ids"][0], out["mm_token_type_ids"][0]
    for kind, type_id in (("image", 1), ("audio", 3)):
        assert torch.equal(types == type_id, ids == processor.media_token_ids[kind])


OPENAI_MESSAGES = [
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "and"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, {"type": "video", "video": "v.mp4"},
        {"type": "image", "image": "x.png"}, {"type": "audio", "audio": "a.wav"},
    ]},
]  # fmt: skip


@pytest.mark.parametrize("name", ["default", "chatml"])
def test_saved_template_writes_media_parts_under_plain_jinja(tmp_path, name):
    """vLLM renders the saved chat template itself, with OpenAI-style parts: the saved file, rendered by jinja2 alone,
    writes each media part as its placeholder, for our template and for an LM's own string-content one."""
    import jinja2

    processor = chatml_processor(DEFAULT_CHAT_TEMPLATE if name == "default" else None)
    processor.save_pretrained(tmp_path)
    source = (tmp_path / "chat_template.jinja").read_text()
    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    environment.globals["namespace"] = jinja2.utils.Namespace
    if name == "default":  # transformers' `{% generation %}` tag: render its body as is
        source = source.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    rendered = environment.from_string(source).render(messages=OPENAI_MESSAGES, add_generation_prompt=True, eos_token="</s>")
    assert rendered.count("<image>") == 2 and rendered.count("<audio>") == 2 and rendered.count("<video>") == 1
    assert "<image> and <audio> <video> <image> <audio>" in rendered
    if name == "chatml":
        assert rendered.startswith("<|im_start|>user\n<image> and") and rendered.endswith("<|im_start|>assistant\n")
