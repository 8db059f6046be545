"""TRL's `SFTTrainer` fine-tunes our tiny model with our processor on a conversational dataset with images and audio,
through a PEFT LoRA config (the package's own LM-scoped targets and projector `modules_to_save`), for 2 steps; the
saved adapter carries the projectors and only assistant tokens are trained (`assistant_only_loss`)."""

import PIL.Image
import pytest
import soundfile
import torch
from safetensors.torch import load_file
from test_modeling import TOKENIZER, build_model
from media_builders import random_image, tone

from modeling_multimodal import MultimodalProcessor
from modeling_multimodal.training.stages import default_lora_targets, modules_to_save

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

CAPTIONS = ["a small red circle in the top left", "a big blue square moving right", "the green triangle is in the middle"]


def conversational_dataset(folder):
    """Rows as TRL takes them: `images` (filled into the `{"type": "image"}` slots) and `messages`, audio by path."""
    rows = []
    for index, caption in enumerate(CAPTIONS * 2):
        image, audio = folder / f"image{index}.png", folder / f"audio{index}.wav"
        PIL.Image.fromarray(random_image(32, 32, seed=index)).save(image)
        soundfile.write(audio, tone(0.3 + 0.1 * index), 16000)
        user = [{"type": "image"}, {"type": "audio", "path": str(audio)}, {"type": "text", "text": "describe the image"}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": caption}]}]
        rows.append({"images": [str(image)], "messages": messages})
    return datasets.Dataset.from_list(rows)


def test_sft_trainer_trains_a_lora_adapter_with_the_projectors(tmp_path):
    model = build_model()
    processor = MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=default_lora_targets(model, encoders=False), modules_to_save=modules_to_save(model)
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, assistant_only_loss=True,
        dataloader_num_workers=0, seed=0,
    )
    projector_before = model.model.multi_modal_projector["audio"].linear_1.weight.detach().clone()
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=conversational_dataset(tmp_path), processing_class=processor, peft_config=lora
    )

    batch = trainer.data_collator([trainer.train_dataset[0]])
    trained = batch["input_ids"][0][batch["labels"][0] != -100]
    assert TOKENIZER.decode(trained) == f"{CAPTIONS[0]} </s>"  # the reply and its EOS, nothing of the prompt
    assert {"pixel_values", "input_features", "input_features_mask"} <= set(batch)

    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    trainer.save_model(str(tmp_path / "adapter"))
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    for modality in ("image", "audio", "video"):
        assert any(f"multi_modal_projector.{modality}." in key for key in keys), (modality, sorted(keys)[:5])
    assert any("language_model" in key and "lora_A" in key for key in keys)
    assert not any("vision_tower" in key or "audio_tower" in key for key in keys)
    projector_after = trainer.model.base_model.model.model.multi_modal_projector["audio"].modules_to_save["default"].linear_1.weight
    assert not torch.equal(projector_after.detach(), projector_before)  # the projector trained


# SmolLM2's own ChatML template, verbatim: no {% generation %} markers, which TRL's assistant_only_loss refuses.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a "
    "helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] "
    "+ '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chatml_model_and_processor(template):
    from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
    from modeling_multimodal.modeling_multimodal import MultimodalForConditionalGeneration

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    torch.manual_seed(0)
    model = MultimodalForConditionalGeneration(tiny_config(tokenizer))
    return model, MultimodalProcessor.from_config_and_components(model.config, tokenizer, chat_template=template)


def test_generation_markers_keep_the_chatml_rendering_and_are_rejected_nowhere():
    from modeling_multimodal.processing.chat_template import with_generation_markers

    marked = with_generation_markers(CHATML)
    assert "{% generation %}" in marked and with_generation_markers(marked) == marked
    _, plain = chatml_model_and_processor(CHATML)
    _, processor = chatml_model_and_processor(marked)
    chat = [{"role": "user", "content": "describe the image"}, {"role": "assistant", "content": "a red circle"}]
    assert processor.apply_chat_template(chat) == plain.apply_chat_template(chat)  # same text, now with markers
    with pytest.raises(ValueError, match="cannot add {% generation %} markers"):
        with_generation_markers("{% for m in messages %}{{ m.role }}{% endfor %}")


def test_sft_assistant_only_loss_with_the_lms_own_chatml_template(tmp_path):
    """The template a composed model saves (the LM's ChatML plus markers) passes TRL's checks; only the reply and
    its <|im_end|> are trained, not the system prompt, the user turn or the placeholders."""
    from modeling_multimodal.processing.chat_template import with_generation_markers

    model, processor = chatml_model_and_processor(with_generation_markers(CHATML))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no",
        report_to="none", use_cpu=True, assistant_only_loss=True, dataloader_num_workers=0, seed=0,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=conversational_dataset(tmp_path), processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trained = batch["input_ids"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(trained).split() == CAPTIONS[0].split() + ["<|im_end|>"]
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
