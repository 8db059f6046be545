"""TRL's `DPOTrainer` on our model, through a LoRA config: image and audio preference pairs (the media reach the
model: the collated batch carries `pixel_values` and `input_features`), a few steps, and the chosen-over-rejected
log-ratio margin rises from 0 while the DPO loss falls. Audio needs `MultimodalPreferenceCollator` (TRL's
vision collator passes images only)."""

import PIL.Image
import pytest
import soundfile
from media_builders import random_image, tone
from test_modeling import TOKENIZER, build_model

from modeling_multimodal import MultimodalProcessor
from modeling_multimodal.integrations.trl import MultimodalPreferenceCollator
from modeling_multimodal.training.stages import default_lora_targets, modules_to_save

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

PAIRS = [("a small red circle in the top left", "a big blue square moving right"),
         ("the green triangle is in the middle", "a small red circle in the top left")]


def preference_dataset(folder):
    """Conversational preference rows as TRL takes them: `images` for the `{"type": "image"}` slot, audio by path."""
    rows = []
    for index in range(4):
        image, audio = folder / f"image{index}.png", folder / f"audio{index}.wav"
        PIL.Image.fromarray(random_image(32, 32, seed=index)).save(image)
        soundfile.write(audio, tone(0.3 + 0.1 * index), 16000)
        chosen, rejected = PAIRS[index % 2]
        user = [{"type": "image"}, {"type": "audio", "path": str(audio)}, {"type": "text", "text": "describe the image"}]
        rows.append({
            "images": [PIL.Image.open(image).convert("RGB")],
            "prompt": [{"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        })
    return datasets.Dataset.from_list(rows)


def test_dpo_on_image_and_audio_pairs_with_lora_raises_the_chosen_margin(tmp_path):
    model = build_model()
    processor = MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=default_lora_targets(model, encoders=False), modules_to_save=modules_to_save(model))
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2, learning_rate=5e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=preference_dataset(tmp_path), processing_class=processor, peft_config=lora,
                               data_collator=MultimodalPreferenceCollator(processor))
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"pixel_values", "input_features"} <= set(batch), sorted(batch)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    margins, losses = [e["rewards/margins"] for e in logs], [e["loss"] for e in logs]
    assert len(logs) == 6 and margins[0] == pytest.approx(0.0, abs=1e-6)
    assert margins[-1] > margins[0] + 0.01 and losses[-1] < losses[0]
