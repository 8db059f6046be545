"""The model behaves as transformers 5.24's own vision-language models do: the forward contract
(`past_key_values`, `return_dict=False`, `shift_labels`, `inputs_embeds` with media, assisted decoding,
per-modality encoder outputs, input checks), `get_<modality>_features` in their layout and `get_retrieval_embeddings`."""

import sys
import warnings

import pytest
import torch
from test_modeling import TEXT, build_model, collate, sample, text_labels
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_multimodal.losses import masked_mean


@pytest.fixture(scope="module")
def model():
    return build_model(retrieval_head=True)  # the retrieval checks need the head (α = 0 builds none)


@pytest.fixture(scope="module")
def batch(model):
    return collate([sample(model, images=1, audios=(120,), videos=1)])


def test_past_key_values_is_accepted_with_a_deprecation_warning(model, batch):
    prefix = {k: v for k, v in batch.items()}
    prefix["input_ids"], prefix["attention_mask"] = batch["input_ids"][:, :-2], batch["attention_mask"][:, :-2]
    rest = {"input_ids": batch["input_ids"][:, -2:], "attention_mask": batch["attention_mask"]}
    full = model(**batch).logits[:, -2:]
    with_cache = model(**rest, cache=model(**prefix, use_cache=True).cache).logits
    with pytest.warns(FutureWarning, match="past_key_values"):
        with_past = model(**rest, past_key_values=model(**prefix, use_cache=True).cache).logits
    torch.testing.assert_close(with_past, with_cache, rtol=0, atol=0)
    torch.testing.assert_close(with_past, full, rtol=1e-4, atol=1e-4)


def test_return_dict_false_gives_the_tuple_of_the_output(model, batch):
    as_dict = model(**batch, labels=text_labels(batch, model))
    as_tuple = model(**batch, labels=text_labels(batch, model), return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    inner = model.model(**batch, return_dict=False)
    torch.testing.assert_close(inner[0], model.model(**batch).last_hidden_state)


def test_shift_labels_equal_labels_shifted_by_hand(model, batch):
    labels = text_labels(batch, model)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    from_labels = model(**batch, labels=labels).loss
    torch.testing.assert_close(model(**batch, shift_labels=shifted).loss, from_labels)
    # A target at the last position (a context-parallel chunk's next token) counts: the loss changes.
    shifted[:, -1] = TEXT[0]
    assert not torch.allclose(model(**batch, shift_labels=shifted).loss, from_labels)


def test_inputs_embeds_with_media_equal_input_ids(model, batch):
    media = {k: v for k, v in batch.items() if k != "input_ids"}
    embeds = model.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(model(inputs_embeds=embeds, **media).logits, model(**batch).logits)
    generated = model.generate(inputs_embeds=embeds, **media, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    expected = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.tolist() == expected[:, batch["input_ids"].shape[1] :].tolist()


def test_assisted_decoding_with_media_equals_greedy(model, batch):
    one = collate([sample(model, images=1, audios=(100,))])
    assistant = build_model(seed=1)
    greedy = model.generate(**one, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assisted = model.generate(**one, max_new_tokens=5, min_new_tokens=5, do_sample=False, assistant_model=assistant)
    assert assisted.tolist() == greedy.tolist()


def test_outputs_carry_each_modalitys_encoder_output(model, batch):
    """As 5.24's VLMs: each `<modality>_outputs` is the tower's output with the LM-ready features as `pooler_output`."""
    out = model(**batch)
    layout = model.config.token_layout
    tower = model.model.vision_tower(batch["pixel_values"])
    torch.testing.assert_close(out.image_outputs.last_hidden_state, tower.last_hidden_state)
    assert [item.shape for item in out.image_outputs.pooler_output] == [(layout.image_tokens(), 32)]
    assert out.video_outputs.last_hidden_state.shape[0] == model.config.video_num_frames  # one row per frame
    assert out.video_outputs.pooler_output.shape == (1, layout.video_tokens(), 32)
    assert out.audio_outputs.pooler_output.shape == (layout.audio_tokens(120), 32)  # Voxtral's: clips' rows, flat
    assert out.audio_outputs.token_counts.tolist() == [layout.audio_tokens(120)]
    torch.testing.assert_close(torch.stack(out.image_hidden_states), model.model.encode_images(batch["pixel_values"]))
    assert model(input_ids=batch["input_ids"][:, -3:]).image_outputs is None  # text only: no encoder ran


def test_decode_steps_do_not_read_tensors_on_the_host(model, batch, monkeypatch):
    """Our placeholder and vocabulary checks (`.tolist()`, `.any()`) run at prefill only (the LM's own masks aside)."""
    prefill = model(**batch, use_cache=True)
    step = {"input_ids": prefill.logits[:, -1:].argmax(-1), "cache": prefill.cache, "use_cache": True}
    callers = []
    for name in ("tolist", "item", "__bool__"):
        original = getattr(torch.Tensor, name)

        def reading(self, *args, _original=original):
            callers.append(sys._getframe(1).f_code.co_filename)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, reading)
    model(**step, attention_mask=torch.ones(1, batch["input_ids"].shape[1] + 1, dtype=torch.long))
    monkeypatch.undo()
    assert not [caller for caller in callers if "modeling_multimodal" in caller], callers


BAD_INPUT_CASES = [
    # (name, change to a correct batch, message fragments)
    ("id_above_vocabulary", lambda b, m: {**b, "input_ids": _set(b["input_ids"], (0, 3), m.config.text_config.vocab_size + 5)},
     ["input_ids[0, 3]", "outside the vocabulary"]),
    ("negative_id", lambda b, m: {**b, "input_ids": _set(b["input_ids"], (0, 2), -1)}, ["input_ids[0, 2] = -1"]),
    ("labels_shorter", lambda b, m: {**b, "labels": b["input_ids"][:, 1:]}, ["labels has shape (1, ", "(batch, seq)"]),
    ("shift_labels_wider", lambda b, m: {**b, "shift_labels": torch.cat([b["input_ids"]] * 2)}, ["shift_labels has shape (2, "]),
]


def _set(ids, where, value):
    ids = ids.clone()
    ids[where] = value
    return ids


@pytest.mark.parametrize("name,corrupt,fragments", BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
def test_bad_inputs_raise_a_value_error_that_says_what(model, batch, name, corrupt, fragments):
    with pytest.raises(ValueError) as error:
        model(**corrupt(batch, model))
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


# --- get_<modality>_features and get_retrieval_embeddings -------------------------------------------------
def _old_retrieval_embeddings(model, pixels, videos, mels, texts):
    """The retrieval embeddings as `get_*_features(...).pooler_output` computed them before `get_retrieval_embeddings`
    (the demo's retrieval scores): a media-only LM pass over the encoders' LM-ready tokens, a text-only pass."""
    clips, _, _ = model.model.encode_audio(mels)
    hidden = model.model.language_model(**texts, use_cache=False).last_hidden_state
    return {
        "image": model._media_embeddings(list(model.model.encode_images(pixels))),
        "video": model._media_embeddings(list(model.model.encode_videos(videos))),
        "audio": model._media_embeddings(clips),
        "text": model.retrieval_head.embed_text(masked_mean(hidden, texts["attention_mask"].bool())),
    }


def test_features_follow_transformers_layout_and_retrieval_embeddings_are_unchanged(model):
    from test_modeling import TOKENIZER

    generator = torch.Generator().manual_seed(0)
    pixels, videos = torch.randn(2, 3, 32, 32, generator=generator), torch.randn(2, 4, 3, 32, 32, generator=generator)
    mels = torch.randn(2, 80, 100, generator=generator)
    texts = TOKENIZER(["a red circle", "a blue square moving"], padding=True, return_tensors="pt")
    inputs = {
        "image": {"pixel_values": pixels},
        "video": {"pixel_values_videos": videos},
        "audio": {"input_features": mels},
        "text": dict(texts),
    }
    for modality, expected in _old_retrieval_embeddings(model, pixels, videos, mels, texts).items():
        embeddings = model.get_retrieval_embeddings(**inputs[modality])
        torch.testing.assert_close(embeddings, expected, rtol=0, atol=0, msg=modality)
    outputs = {
        "image": model.get_image_features(pixels),
        "video": model.get_video_features(videos),
        "audio": model.get_audio_features(mels),
        "text": model.get_text_features(**texts),
    }
    assert all(isinstance(output, BaseModelOutputWithPooling) for output in outputs.values())
    layout, vision_hidden = model.config.token_layout, model.config.vision_config.hidden_size
    # LLaVA's: the tower's output, one (tokens, d) LM-ready entry per image as pooler_output.
    assert outputs["image"].last_hidden_state.shape[::2] == (2, vision_hidden)
    torch.testing.assert_close(torch.stack(outputs["image"].pooler_output), model.model.encode_images(pixels))
    # LLaVA-NeXT-Video's: the tower's output over all frames, (n, tokens, d) LM-ready as pooler_output.
    assert outputs["video"].last_hidden_state.shape[::2] == (2 * 4, vision_hidden)
    torch.testing.assert_close(outputs["video"].pooler_output, model.model.encode_videos(videos))
    # Voxtral's: the encoder's selected layer, every clip's LM-ready rows in one (total_tokens, d) pooler_output.
    assert outputs["audio"].last_hidden_state.shape[::2] == (2, model.config.audio_config.d_model)
    assert outputs["audio"].pooler_output.shape == (2 * layout.audio_tokens(100), 32)
    assert outputs["audio"].token_counts.tolist() == [layout.audio_tokens(100)] * 2
    assert outputs["text"].last_hidden_state.shape == (2, texts["input_ids"].shape[1], 32)
    assert outputs["text"].pooler_output is None


def test_audio_features_split_by_the_processors_counts_give_each_clip(model):
    """vLLM's Transformers backend splits `get_audio_features(...).pooler_output` (one tensor, `.ndim` read) by the
    token counts the processor wrote into the prompt; clips of different lengths must come back as encoded alone."""
    layout = model.config.token_layout
    mels = torch.randn(2, 80, 120, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 120, dtype=torch.long)
    mask[1, 70:] = 0  # the second clip is 70 mel frames long, padded to 120
    features = model.get_audio_features(mels, mask)
    assert isinstance(features.pooler_output, torch.Tensor) and features.pooler_output.ndim == 2
    processor_counts = [layout.audio_tokens(120), layout.audio_tokens(70)]
    assert features.token_counts.tolist() == processor_counts
    for clip, (mel, length) in enumerate(zip(mels, (120, 70))):
        (alone,), _, _ = model.model.encode_audio(mel[None, :, :length])
        torch.testing.assert_close(features.pooler_output.split(processor_counts)[clip], alone, msg=f"clip {clip}")
        torch.testing.assert_close(features.clips()[clip], alone, msg=f"clip {clip}")
    as_tuple = model.get_audio_features(mels, mask, return_dict=False)
    torch.testing.assert_close(as_tuple[1], features.pooler_output)


def test_features_accept_return_dict_and_output_hidden_states(model):
    pixels = torch.randn(2, 3, 32, 32)
    with_states = model.get_image_features(pixels, output_hidden_states=True)
    assert len(with_states.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    as_tuple = model.get_image_features(pixels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], with_states.last_hidden_state)
    torch.testing.assert_close(as_tuple[1], with_states.pooler_output)
    ids = torch.tensor([TEXT[:4]])
    assert len(model.get_text_features(ids, output_hidden_states=True).hidden_states) == 3  # embeddings + 2 layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(model(input_ids=ids, cache=DynamicCache(config=model.config.text_config)).logits, torch.Tensor)


def test_static_cache_generation_equals_dynamic(model):
    """Static cache holds (`cache_implementation="static"`). `torch.compile` is not declared (`_can_compile_fullgraph`
    stays False): the prefill's placeholder checks read counts on the host."""
    batch = collate([sample(model, images=1, audios=(100,)), sample(model, videos=1)])
    dynamic = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    static = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert not model._can_compile_fullgraph


def test_features_follow_the_configs_output_flags():
    """`config.output_hidden_states` / `output_attentions` apply when the call does not say (transformers' rule)."""
    model = build_model()
    model.config.output_hidden_states = True
    pixels = torch.randn(1, 3, 32, 32)
    assert len(model.get_image_features(pixels).hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert model.get_image_features(pixels, output_hidden_states=False).hidden_states is None
    model.set_attn_implementation("eager")
    attentions = model.get_text_features(torch.tensor([TEXT[:4]]), output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape[-1] == 4
