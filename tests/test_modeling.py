"""MultimodalForConditionalGeneration: forward per modality, losses, gradients, generation, save/load."""

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from modeling_multimodal import MultimodalConfig, MultimodalForConditionalGeneration, MultimodalModel
from modeling_multimodal.encoders import encode_audio
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.training.objective import TrainingObjective, freeze_unreachable_parameters

TOKENIZER = tiny_tokenizer()
PAD = TOKENIZER.pad_token_id
TEXT = TOKENIZER("a small red circle in the top left", add_special_tokens=False)["input_ids"]


def build_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(TOKENIZER, **overrides)
    return MultimodalForConditionalGeneration(config).eval()


def sample(model, images=0, audios=(), videos=0, text=TEXT):
    """One sample's ids with expanded placeholders, and its media tensors (deterministic per content)."""
    config, layout = model.config, model.config.token_layout
    ids = [TOKENIZER.bos_token_id]
    media = {"pixel_values": [], "input_features": [], "pixel_values_videos": []}
    for i in range(images):
        ids += [config.image_token_id] * layout.image_tokens()
        media["pixel_values"].append(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(10 + i)))
    for i in range(videos):
        ids += [config.video_token_id] * layout.video_tokens()
        media["pixel_values_videos"].append(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(20 + i)))
    for i, frames in enumerate(audios):
        ids += [config.audio_token_id] * layout.audio_tokens(frames)
        media["input_features"].append(torch.randn(80, frames, generator=torch.Generator().manual_seed(30 + i)))
    return ids + list(text), media


def collate(samples, padding_side="left"):
    """Pad ids (left by default) and stack media in sample order; audio right-padded with a frame mask."""
    longest = max(len(ids) for ids, _ in samples)
    input_ids, attention_mask = [], []
    for ids, _ in samples:
        pad = [PAD] * (longest - len(ids))
        input_ids.append(pad + ids if padding_side == "left" else ids + pad)
        mask = [0] * len(pad) + [1] * len(ids)
        attention_mask.append(mask if padding_side == "left" else mask[::-1])
    batch = {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask)}
    images = [x for _, m in samples for x in m["pixel_values"]]
    videos = [x for _, m in samples for x in m["pixel_values_videos"]]
    audios = [x for _, m in samples for x in m["input_features"]]
    if images:
        batch["pixel_values"] = torch.stack(images)
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    if audios:
        frames = max(a.shape[-1] for a in audios)
        batch["input_features"] = torch.stack([torch.nn.functional.pad(a, (0, frames - a.shape[-1])) for a in audios])
        batch["input_features_mask"] = torch.stack(
            [(torch.arange(frames) < a.shape[-1]).long() for a in audios]
        )
    return batch


def text_labels(batch, model):
    labels = batch["input_ids"].clone()
    media_ids = [model.config.image_token_id, model.config.audio_token_id, model.config.video_token_id]
    labels[torch.isin(labels, torch.tensor(media_ids))] = -100
    labels[batch["attention_mask"] == 0] = -100
    return labels


FORWARD_CASES = [
    ("text_only", dict()),
    ("image", dict(images=1)),
    ("two_images", dict(images=2)),
    ("audio", dict(audios=(200,))),
    ("video", dict(videos=1)),
    ("all_together", dict(images=1, audios=(120, 200), videos=1)),
]


@pytest.mark.parametrize("name,content", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_each_modality(name, content):
    model = build_model()
    batch = collate([sample(model, **content)])
    out = model(**batch, labels=text_labels(batch, model))
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss_text is not None
    assert torch.equal(out.loss, out.loss_text)  # λ = α = 0


def test_mixed_batch_of_text_only_and_media_samples():
    """In a batch mixing text-only, image, audio and video samples, each sample's logits are its logits alone."""
    model = build_model()
    samples = [sample(model), sample(model, images=1), sample(model, audios=(90,)), sample(model, videos=1)]
    batch = collate(samples, padding_side="right")  # real tokens at positions 0..n-1, as when alone
    with torch.no_grad():
        together = model(**batch).logits
        for index, one in enumerate(samples):
            alone = model(**collate([one])).logits[0]
            torch.testing.assert_close(together[index, : len(one[0])], alone, rtol=1e-4, atol=1e-5, msg=f"sample {index}")


def test_audio_tokens_follow_clip_length_not_30_seconds():
    model = build_model()
    layout = model.config.token_layout
    assert layout.audio_tokens(200) == 50  # 2 s of mel frames -> 100 encoder positions -> pooled by 2
    assert layout.audio_tokens(3000) == 750 and layout.audio_tokens(6000) == 750  # capped by the encoder
    clips, states, positions = model.model.encode_audio(torch.randn(1, 80, 200))
    assert clips[0].shape == (50, 32) and states.shape[1] == 100 and positions.tolist() == [100]


def test_padded_audio_clip_does_not_change_another_clip():
    model = build_model()
    short, long = torch.randn(1, 80, 77), torch.randn(1, 80, 300)
    alone, _, _ = model.model.encode_audio(short)
    batch = torch.cat([torch.nn.functional.pad(short, (0, 223)), long])
    mask = torch.stack([torch.arange(300) < 77, torch.ones(300, dtype=torch.bool)]).long()
    together, _, _ = model.model.encode_audio(batch, mask)
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)


def test_length_following_audio_pass_equals_whisper_forward_at_30_seconds():
    model = build_model()
    features = torch.randn(2, 80, 3000)
    tower = model.model.audio_tower
    reference = tower(features).last_hidden_state
    states, positions = encode_audio(tower, features, torch.tensor([3000, 3000]), feature_layer=-1)
    torch.testing.assert_close(states, reference, rtol=1e-5, atol=1e-5)
    assert positions.tolist() == [1500, 1500]


LOSS_CASES = [
    # (name, λ, α, expect_other, expect_cross)
    ("text_only_loss", 0.0, 0.0, False, False),
    ("lambda_only", 0.5, 0.0, True, False),
    ("alpha_only", 0.0, 0.3, False, True),
    ("both", 0.5, 0.3, True, True),
]


@pytest.mark.parametrize("name,lam,alpha,expect_other,expect_cross", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_loss_terms_and_weights(name, lam, alpha, expect_other, expect_cross, monkeypatch):
    model = build_model(auxiliary_loss_weight=lam, contrastive_loss_weight=alpha, auxiliary_tasks=["audio_ctc", "media_bow"])
    batch = collate([sample(model, audios=(200,)), sample(model, images=1), sample(model, audios=(160,))])
    calls = {"audio_ctc": 0, "media_bow": 0, "text_pass": 0}
    for task, head in model.auxiliary_heads.items():
        head.register_forward_hook(lambda *a, task=task: calls.__setitem__(task, calls[task] + 1))
    original = model._text_embeddings

    def counting(*args, **kwargs):
        calls["text_pass"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "_text_embeddings", counting)
    pooling = model._media_text_pairs
    monkeypatch.setattr(model, "_media_text_pairs", lambda *a: calls.__setitem__("pairs", calls.get("pairs", 0) + 1) or pooling(*a))
    pair = TOKENIZER(["a small red circle", "a big blue square", "the green triangle"], padding=True, return_tensors="pt")
    out = model(
        **batch,
        labels=text_labels(batch, model),
        ctc_labels=torch.tensor([TEXT[:4], TEXT[:3] + [-100]]),
        pair_input_ids=pair["input_ids"],
        pair_attention_mask=pair["attention_mask"],
    )
    assert (out.loss_auxiliary is not None) == expect_other
    assert calls["audio_ctc"] == calls["media_bow"] == int(expect_other)
    assert calls.get("pairs", 0) == int(expect_other or expect_cross)  # λ = α = 0: no media pooling at all
    assert (out.loss_contrastive is not None) == expect_cross and calls["text_pass"] == int(expect_cross)
    expected = out.loss_text + lam * (out.loss_auxiliary if expect_other else 0) + alpha * (out.loss_contrastive if expect_cross else 0)
    torch.testing.assert_close(out.loss, expected)


def test_labelled_loss_matches_full_logits_cross_entropy():
    model = build_model()
    batch = collate([sample(model, images=1), sample(model, audios=(100,))])
    labels = text_labels(batch, model)
    out = model(**batch, labels=labels)
    shift_logits, shift_labels = out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    reference = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    torch.testing.assert_close(out.loss_text, reference, rtol=1e-5, atol=1e-6)
    lean = model(**batch, labels=labels, return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, out.loss)


def test_ctc_loss_matches_torch_reference():
    model = build_model(auxiliary_loss_weight=1.0)
    batch = collate([sample(model, audios=(200,))])
    ctc_labels = torch.tensor([TEXT[:5]])
    out = model(**batch, ctc_labels=ctc_labels)
    _, states, positions = model.model.encode_audio(batch["input_features"], batch["input_features_mask"])
    log_probs = model.auxiliary_heads["audio_ctc"](states).log_softmax(-1).transpose(0, 1)
    reference = torch.nn.functional.ctc_loss(
        log_probs, ctc_labels, positions, torch.tensor([5]), blank=model.config.text_config.vocab_size
    )
    torch.testing.assert_close(out.loss_auxiliary, reference)


def test_media_bag_of_words_loss_matches_reference():
    model = build_model(auxiliary_loss_weight=1.0, auxiliary_tasks=["media_bow"])
    batch = collate([sample(model, images=1), sample(model, audios=(160,), videos=1), sample(model)])
    texts = ["a red circle red", "the green triangle", "a big blue square"]  # the third sample has no media
    pair = TOKENIZER(texts, padding=True, return_tensors="pt")
    out = model(**batch, pair_input_ids=pair["input_ids"], pair_attention_mask=pair["attention_mask"])
    inner = model.model(**batch)
    head, per_sample = model.auxiliary_heads["media_bow"], []
    for row in range(2):
        pooled = inner.inputs_embeds[row][inner.media_mask[row].bool()].mean(0)
        log_probs = head(pooled).log_softmax(-1)
        words = sorted(set(TOKENIZER(texts[row], add_special_tokens=False)["input_ids"]))  # "red" counts once
        per_sample.append(-log_probs[words].mean())
    torch.testing.assert_close(out.loss_auxiliary, torch.stack(per_sample).mean())
    # The training objective divides by the pairs of a whole window (here 4, twice this batch's 2).
    halved = TrainingObjective(model)(**batch, pair_input_ids=pair["input_ids"], pair_attention_mask=pair["attention_mask"], num_items={"media_bow": 4})
    torch.testing.assert_close(halved.loss_auxiliary, out.loss_auxiliary / 2)


def test_gradients_reach_exactly_the_unfrozen_modules():
    model = build_model(auxiliary_loss_weight=0.5, contrastive_loss_weight=0.5, freeze_language_model=True).train()
    batch = collate([sample(model, images=1, audios=(160,), videos=1), sample(model, images=1, audios=(100,), videos=1)])
    pair = TOKENIZER(["a small red circle", "a big blue square"], padding=True, return_tensors="pt")
    out = model(
        **batch, labels=text_labels(batch, model), ctc_labels=torch.tensor([TEXT[:3], TEXT[:3]]),
        pair_input_ids=pair["input_ids"], pair_attention_mask=pair["attention_mask"],
    )
    out.loss.backward()
    for name, param in model.named_parameters():
        frozen = name.startswith(("model.vision_tower", "model.audio_tower", "model.language_model"))
        if frozen:
            assert not param.requires_grad and param.grad is None, name
        elif param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    trained = {n.split(".")[1] if n.startswith("model.") else n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"multi_modal_projector", "lm_head", "auxiliary_heads", "retrieval_head"}


def test_frozen_towers_keep_no_activations():
    model = build_model().train()
    features = model.model.encode_images(torch.randn(2, 3, 32, 32))
    # The projector trains, so its output has a graph; the frozen tower below it has none.
    assert features.requires_grad
    tower_out = model.model.get_image_features(torch.randn(1, 3, 32, 32), output_hidden_states=True)
    assert tower_out.last_hidden_state.grad_fn is None and all(h.grad_fn is None for h in tower_out.hidden_states)


def greedy_reference(model, batch, steps):
    """Greedy decoding by hand with the KV cache: prefill once (media encoded once), then one token per step.
    EOS is never picked, as `generate(..., min_new_tokens=steps)` forbids it."""

    def pick(logits):
        return logits[:, -1].index_fill(-1, torch.tensor([TOKENIZER.eos_token_id]), float("-inf")).argmax(-1)

    out = model(**batch, use_cache=True)
    cache, mask = out.cache, batch["attention_mask"]
    tokens = [pick(out.logits)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tokens[-1][:, None], attention_mask=mask, cache=cache, use_cache=True)
        cache = out.cache
        tokens.append(pick(out.logits))
    return torch.stack(tokens, dim=1)


def test_generate_equals_manual_greedy_loop_with_cache():
    model = build_model()
    batch = collate([sample(model, images=1, audios=(120,))])
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    prompt_length = batch["input_ids"].shape[1]
    torch.testing.assert_close(generated[:, prompt_length:], greedy_reference(model, batch, 6))


def test_media_encoded_only_at_prefill():
    model = build_model()
    batch = collate([sample(model, images=1, videos=1)])
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(calls) == 2  # one image pass + one video pass, both at prefill


def test_batched_left_padded_generation_equals_one_by_one():
    model = build_model()
    samples = [
        sample(model, images=1, text=TEXT[:2]),
        sample(model, audios=(200,), text=TEXT),
        sample(model, text=TEXT[:5]),
        sample(model, videos=1, audios=(90,), text=TEXT[:3]),
    ]
    batch = collate(samples)
    together = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    together = together[:, batch["input_ids"].shape[1] :]
    batch_logits = model(**batch).logits
    for i, one in enumerate(samples):
        single = collate([one])
        alone = model.generate(**single, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert together[i].tolist() == alone[0, single["input_ids"].shape[1] :].tolist(), f"sample {i}"
        torch.testing.assert_close(batch_logits[i, -1], model(**single).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_save_and_load_gives_identical_logits(tmp_path):
    model = build_model(auxiliary_loss_weight=0.5, contrastive_loss_weight=0.2)
    batch = collate([sample(model, images=1, audios=(150,), videos=1)])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.token_layout == model.config.token_layout
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param, model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_auto_classes_resolve(tmp_path):
    model = build_model()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MultimodalConfig)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), MultimodalForConditionalGeneration)
    assert isinstance(AutoModel.from_config(model.config), MultimodalModel)


MISMATCH_CASES = [
    # (name, build the batch from a correct one, expected message fragments)
    ("one_token_short", lambda b, m: _drop_placeholder(b, m.config.image_token_id, sample_index=1), ["Sample 1", "<image>", "15", "16"]),
    ("no_media_given", lambda b, m: {k: v for k, v in b.items() if k != "pixel_values"}, ["<image> placeholders", "samples [1]"]),
    ("extra_image", lambda b, m: {**b, "pixel_values": torch.cat([b["pixel_values"], b["pixel_values"]])}, ["1 image item(s)", "no sample"]),
]


def _drop_placeholder(batch, token_id, sample_index):
    ids = batch["input_ids"].clone()
    position = (ids[sample_index] == token_id).nonzero()[0, 0]
    ids[sample_index, position] = TEXT[0]
    return {**batch, "input_ids": ids}


@pytest.mark.parametrize("name,corrupt,fragments", MISMATCH_CASES, ids=[c[0] for c in MISMATCH_CASES])
def test_placeholder_count_mismatch_names_sample_and_counts(name, corrupt, fragments):
    model = build_model()
    batch = collate([sample(model), sample(model, images=1)])
    with pytest.raises(ValueError) as error:
        model(**corrupt(batch, model))
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_gradient_checkpointing_gives_same_gradients():
    batch = None
    grads = []
    for checkpointing in (False, True):
        model = build_model(freeze_vision_tower=False, freeze_audio_tower=False).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            layers = [m for m in model.modules() if type(m).__name__.endswith(("EncoderLayer", "DecoderLayer"))]
            assert {type(m).__name__ for m in layers} == {"CLIPEncoderLayer", "WhisperEncoderLayer", "LlamaDecoderLayer"}
            assert all(m.gradient_checkpointing for m in layers)
        batch = batch or collate([sample(model, images=1, audios=(100,))])
        model(**batch, labels=text_labels(batch, model)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_forward_and_sdpa_default():
    model = build_model().to(torch.bfloat16)
    assert model.config.text_config._attn_implementation == "sdpa"
    batch = collate([sample(model, images=1, audios=(100,))])
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    out = model(**batch, labels=text_labels(batch, model))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_no_split_modules_cover_every_tower():
    model = build_model()
    assert {"CLIPEncoderLayer", "LlamaDecoderLayer"} <= set(model._no_split_modules)
    assert any(name.startswith("Whisper") for name in model._no_split_modules)


def test_retrieval_embeddings_are_normalised_and_consistent():
    model = build_model(retrieval_head=True)  # α = 0: the head only when asked for
    pixels = torch.randn(3, 3, 32, 32)
    image = model.get_retrieval_embeddings(pixel_values=pixels)
    text = model.get_retrieval_embeddings(**TOKENIZER(["a red circle", "a blue square moving"], padding=True, return_tensors="pt"))
    audio = model.get_retrieval_embeddings(input_features=torch.randn(2, 80, 100))
    video = model.get_retrieval_embeddings(pixel_values_videos=torch.randn(2, 4, 3, 32, 32))
    for embeds, n in ((image, 3), (text, 2), (audio, 2), (video, 2)):
        assert embeds.shape == (n, 32)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(n))
    # An image's embedding does not depend on the other images of the batch.
    torch.testing.assert_close(model.get_retrieval_embeddings(pixel_values=pixels[:1]), image[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of input_ids, pixel_values"):
        model.get_retrieval_embeddings(input_ids=torch.tensor([TEXT]), pixel_values=pixels)


BACKBONE_CASES = [
    # (name, config overrides): any causal LM and vision tower transformers knows plugs in
    ("siglip_vision", lambda: dict(vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8))),
    ("vit_vision", lambda: dict(vision_config=transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8))),
    ("dinov2_vision", lambda: dict(vision_config=transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8))),
    ("qwen2_lm", lambda: dict(text_config=transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(TOKENIZER)))),
    ("gpt2_lm", lambda: dict(text_config=transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(TOKENIZER), tie_word_embeddings=True))),
    ("qwen2_audio_encoder", lambda: dict(audio_config=transformers.Qwen2AudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80))),
]


@pytest.mark.parametrize("name,overrides", BACKBONE_CASES, ids=[c[0] for c in BACKBONE_CASES])
def test_backbones_plug_in_and_batch_invariance_holds(name, overrides, tmp_path):
    model = build_model(**overrides())
    samples = [sample(model, images=1, audios=(80,), text=TEXT[:2]), sample(model, videos=1, text=TEXT)]
    batch = collate(samples)
    logits = model(**batch).logits
    for i, one in enumerate(samples):
        torch.testing.assert_close(logits[i, -1], model(**collate([one])).logits[0, -1], rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=0)


def test_training_objective_gives_every_trainable_parameter_a_gradient_without_changing_the_loss():
    model = build_model(auxiliary_loss_weight=0.5, contrastive_loss_weight=0.5, freeze_vision_tower=False, freeze_audio_tower=False).train()
    unused = freeze_unreachable_parameters(model)
    # vision_feature_layer=-2: the tower's last layer and post-layernorm can never receive a gradient.
    assert unused and all(n.startswith("model.vision_tower.") and ("layers.1." in n or "post_layernorm" in n) for n in unused), unused
    batch = collate([sample(model), sample(model)])  # text only: no tower, projector or aux head is used
    labels = text_labels(batch, model)
    plain = model(**batch, labels=labels)
    touched = TrainingObjective(model)(**batch, labels=labels)
    torch.testing.assert_close(touched.loss, plain.loss)
    torch.testing.assert_close(touched.loss_text, plain.loss_text)
    touched.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], missing


def test_training_contrastive_loss_uses_the_retrieval_embeddings():
    """L_contrastive in forward is InfoNCE over exactly what get_retrieval_embeddings returns."""
    model = build_model(contrastive_loss_weight=1.0)
    samples = [sample(model, images=1, text=TEXT[:2]), sample(model, audios=(100,), text=TEXT[:3]), sample(model, videos=1)]
    texts = ["a small red circle", "a big blue square", "a green star moving left"]
    pair = TOKENIZER(texts, padding=True, return_tensors="pt")
    batch = collate(samples, padding_side="right")
    loss = model(**batch, pair_input_ids=pair["input_ids"], pair_attention_mask=pair["attention_mask"]).loss_contrastive
    media = torch.cat([
        model.get_retrieval_embeddings(pixel_values=batch["pixel_values"]),
        model.get_retrieval_embeddings(input_features=batch["input_features"], input_features_mask=batch["input_features_mask"]),
        model.get_retrieval_embeddings(pixel_values_videos=batch["pixel_values_videos"]),
    ])
    text = model.get_retrieval_embeddings(input_ids=pair["input_ids"], attention_mask=pair["attention_mask"])
    torch.testing.assert_close(loss, model.retrieval_head.contrastive_loss(media, text), rtol=1e-5, atol=1e-5)


def test_contrastive_loss_with_packed_segments_equals_one_sample_per_row():
    model = build_model(contrastive_loss_weight=1.0)
    samples = [sample(model, images=1, text=TEXT[:2]), sample(model, audios=(100,), text=TEXT[:3]), sample(model, images=1, text=TEXT[:1])]
    pair = TOKENIZER(["a small red circle", "a big blue square", "the green triangle"], padding=True, return_tensors="pt")
    rows = collate(samples, padding_side="right")
    per_row = model(**rows, pair_input_ids=pair["input_ids"], pair_attention_mask=pair["attention_mask"]).loss_contrastive
    # The same three samples packed into one row, positions restarting per sample.
    ids = torch.cat([torch.tensor(s[0]) for s in samples])[None]
    segment_ids = torch.cat([torch.full((len(s[0]),), i) for i, s in enumerate(samples)])[None]
    position_ids = torch.cat([torch.arange(len(s[0])) for s in samples])[None]
    packed = model(
        input_ids=ids, position_ids=position_ids, segment_ids=segment_ids, use_cache=False,
        pixel_values=rows["pixel_values"], input_features=rows["input_features"], input_features_mask=rows["input_features_mask"],
        pair_input_ids=pair["input_ids"], pair_attention_mask=pair["attention_mask"],
    ).loss_contrastive
    torch.testing.assert_close(packed, per_row, rtol=1e-5, atol=1e-5)


def test_video_frames_can_share_the_image_projector(tmp_path):
    """video_projector="image": one projector for images and frames, so a frame's tokens are an image's."""
    model = build_model(video_projector="image", video_temporal_pool_stride=1, video_spatial_pool_stride=1, image_pool_stride=1)
    assert sorted(model.model.multi_modal_projector) == ["audio", "image"]
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        frames_as_images = model.model.encode_images(video.flatten(0, 1)).view(2, -1, model.config.text_config.hidden_size)
        torch.testing.assert_close(model.model.encode_videos(video), frames_as_images)
    model.train()
    batch = collate([sample(model, videos=1)])
    model(**batch, labels=text_labels(batch, model)).loss.backward()
    assert model.model.multi_modal_projector["image"].linear_1.weight.grad.abs().sum() > 0  # the video loss trains it
    model.save_pretrained(tmp_path)
    loaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_videos(video), model.eval().model.encode_videos(video), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"video_projector='audio'; expected one of \('linear', 'mlp', 'image'\)"):
        tiny_config(TOKENIZER, video_projector="audio")


def reference_conv_stem(stem, pixels):
    """The stem's computation written out with torch.nn.functional: 3x3 stride-2 convs with GELU, then a 1x1."""
    convs = [m for m in stem.convs if isinstance(m, torch.nn.Conv2d)]
    hidden = pixels
    for conv in convs:
        hidden = torch.nn.functional.gelu(torch.nn.functional.conv2d(hidden, conv.weight, conv.bias, stride=2, padding=1))
    return torch.nn.functional.conv2d(hidden, stem.proj.weight, stem.proj.bias)


def test_conv_stem_replaces_the_patch_embedding(tmp_path):
    """vision_stem="conv": the tower's patch convolution becomes a conv stack; tokens, training and save/load hold."""
    from modeling_multimodal.vision_stem import ConvPatchStem

    patch_model = build_model()
    model = build_model(vision_stem="conv", freeze_vision_tower=False)
    stem = model.model.vision_tower.embeddings.patch_embedding
    assert isinstance(stem, ConvPatchStem)
    assert [m.stride for m in stem.convs if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3  # 8-px patches
    # Its own (Kaiming) initialisation survives post_init, not the tower's std-0.02 patch-embedding init.
    assert stem.convs[0].weight.std() > 0.15
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stem(pixels), reference_conv_stem(stem, pixels))
        assert model.model.encode_images(pixels).shape == patch_model.model.encode_images(pixels).shape
        assert model.model.encode_videos(torch.randn(1, 4, 3, 32, 32)).shape[1] == model.config.token_layout.video_tokens()
    model.train()
    batch = collate([sample(model, images=1, videos=1)])
    model(**batch, labels=text_labels(batch, model)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    model.save_pretrained(tmp_path)
    loaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.vision_tower.embeddings.patch_embedding, ConvPatchStem)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "vision_config",
    [
        {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        {"model_type": "dinov2", "hidden_size": 32, "mlp_ratio": 2, "num_hidden_layers": 2,
         "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ],
    ids=lambda c: c["model_type"],
)
def test_conv_stem_fits_every_supported_vision_tower(vision_config):
    from modeling_multimodal.vision_stem import ConvPatchStem

    config = tiny_config(TOKENIZER, vision_config=vision_config, vision_stem="conv")
    model = MultimodalForConditionalGeneration(config).eval()
    assert sum(isinstance(m, ConvPatchStem) for m in model.model.vision_tower.modules()) == 1
    with torch.no_grad():
        tokens = model.model.encode_images(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, config.token_layout.image_tokens(), config.text_config.hidden_size)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_stem": "resnet"}, r"vision_stem='resnet'; expected one of \('patch', 'conv'\)"),
        ({"vision_stem": "conv", "vision_config": {"model_type": "clip_vision_model", "image_size": 36, "patch_size": 6}},
         r"vision_stem='conv' needs a power-of-two patch_size >= 2, got 6"),
    ],
)
def test_conv_stem_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(TOKENIZER, **overrides)


def test_projectors_and_bag_of_words_head_keep_torch_default_init():
    """Projectors and the media bag-of-words head start at PyTorch's Linear init (as LLaVA's own code), not N(0, 0.02)."""
    model = build_model(auxiliary_loss_weight=0.5, auxiliary_tasks=["audio_ctc", "media_bow"])
    layers = [m for p in model.model.multi_modal_projector.values() for m in p.modules() if isinstance(m, torch.nn.Linear)]
    layers.append(model.auxiliary_heads["media_bow"].classifier)
    for layer in layers:
        bound = layer.in_features**-0.5  # kaiming_uniform(a=sqrt(5)) and the bias both draw from U(-bound, bound)
        assert layer.weight.abs().max() <= bound and layer.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.15)
        assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0
    # The LM keeps transformers' scheme.
    assert model.model.language_model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_patch_checkpoint_loaded_with_conv_stem_draws_the_missing_stem(tmp_path):
    """from_pretrained(patch checkpoint, vision_stem="conv"): the stem is drawn fresh (finite), the rest is loaded."""
    from modeling_multimodal.vision_stem import ConvPatchStem

    model = build_model()
    model.save_pretrained(tmp_path)
    loaded = MultimodalForConditionalGeneration.from_pretrained(tmp_path, vision_stem="conv").eval()
    stem = loaded.model.vision_tower.embeddings.patch_embedding
    assert isinstance(stem, ConvPatchStem)
    for name, param in stem.named_parameters():
        assert torch.isfinite(param).all() and param.abs().max() < 1, name  # drawn, not left as uninitialised memory
        assert param.abs().sum() > 0 or name.endswith("bias"), name
    torch.testing.assert_close(
        loaded.model.multi_modal_projector["image"].linear_1.weight, model.model.multi_modal_projector["image"].linear_1.weight, rtol=0, atol=0
    )
    batch = collate([sample(loaded, images=1)])
    with torch.no_grad():
        assert torch.isfinite(loaded(**batch).logits).all()


def test_several_vision_feature_layers_are_concatenated_like_llava_next():
    model = build_model(vision_feature_layer=[0, -1], video_projector="image")
    assert model.config.vision_feature_dim == 64
    assert model.model.multi_modal_projector["image"].linear_1.in_features == 64
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        expected = model.model.multi_modal_projector["image"](torch.cat([hidden[0], hidden[-1]], -1)[:, 1:])
        torch.testing.assert_close(model.model.encode_images(pixels), expected)
    ids, media = sample(model, images=1, videos=1)
    out = model(**collate([(ids, media)]))
    assert out.logits.shape[1] == len(ids)
    with pytest.raises(ValueError, match=r"vision_feature_layer=\[0, 5\] is outside"):
        tiny_config(TOKENIZER, vision_feature_layer=[0, 5])


def test_audio_features_with_every_layer_equal_the_length_following_pass():
    """get_audio_features(output_hidden_states / output_attentions): N + 1 states and N attention maps, the same
    LM-ready features as the pass that stops at the selected layer, whichever layer the config selects."""
    from modeling_multimodal.testing_utils import tiny_config

    for layer in (-1, -2):
        model = MultimodalForConditionalGeneration(tiny_config(audio_feature_layer=layer, attn_implementation="eager")).eval()
        features, mask = torch.randn(2, 80, 60), torch.ones(2, 60, dtype=torch.long)
        mask[1, 40:] = 0
        with torch.no_grad():
            plain = model.get_audio_features(features, mask)
            full = model.get_audio_features(features, mask, output_hidden_states=True, output_attentions=True)
        layers = model.config.audio_config.encoder_layers
        assert len(full.hidden_states) == layers + 1 and len(full.attentions) == layers
        assert full.attentions[0].shape == (2, model.config.audio_config.encoder_attention_heads, 30, 30)
        torch.testing.assert_close(full.hidden_states[layer], full.last_hidden_state)
        torch.testing.assert_close(full.last_hidden_state, plain.last_hidden_state)
        torch.testing.assert_close(full.pooler_output, plain.pooler_output)
        assert full.token_counts.tolist() == plain.token_counts.tolist()
        assert plain.hidden_states is None and plain.attentions is None
