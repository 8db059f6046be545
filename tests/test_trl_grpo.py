"""TRL's `GRPOTrainer` on our model with image prompts, through a LoRA config: a toy reward (how often the completion
names a colour), a few steps, and the mean reward rises.

TRL 1.16's GRPO carries images only: it collects `{"type": "image"}` parts (or an `image` / `images` column), calls
the processor with `images=`, and its per-token log-prob pass takes image fields alone (`pixel_values`,
`image_grid_thw`, ...), so an audio or video part cannot reach the model there (see docs/TRAINING.md). It suppresses
only `config.image_token_id` while sampling; our model has more placeholders, and a sampled one is a placeholder
without its media in the scoring pass, so every placeholder id goes into `generation_kwargs["suppress_tokens"]`.
"""

import PIL.Image
import pytest
import torch
from media_builders import random_image
from test_modeling import TOKENIZER, build_model

from modeling_multimodal import MultimodalProcessor
from modeling_multimodal.training.stages import default_lora_targets, modules_to_save

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

COLOURS = set(TOKENIZER.convert_tokens_to_ids(["red", "green", "blue", "white"]))


def names_colours(completion_ids, **kwargs) -> list[float]:
    """The toy task's reward: the share of completion tokens that are colour words (about 4 in 50 untrained)."""
    return [sum(token in COLOURS for token in ids) / max(len(ids), 1) for ids in completion_ids]


def image_prompts(count: int):
    """Conversational prompts with the image inside its content part, as GRPO reads them."""
    rows = []
    for index in range(count):
        image = PIL.Image.fromarray(random_image(32, 32, seed=index))
        content = [{"type": "image", "image": image}, {"type": "text", "text": "describe the image"}]
        rows.append({"prompt": [{"role": "user", "content": content}]})
    return datasets.Dataset.from_list(rows)


def placeholder_ids(config) -> list[int]:
    return [getattr(config, f"{modality}_token_id") for modality in config.modalities]


def test_grpo_on_image_prompts_with_lora_raises_the_reward(tmp_path):
    model = build_model()
    processor = MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)
    # The tiny LM's logits are its final norm times an LM head of init scale 0.02: LoRA inside the LM alone cannot make
    # them peaked, so the toy task also trains the LM head (a real LM's head already is).
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=default_lora_targets(model, encoders=False),
                           modules_to_save=modules_to_save(model) + ["lm_head"])
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=8, num_generations=8,
        max_completion_length=6, learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, dataloader_num_workers=0, seed=0, beta=0.0,
        generation_kwargs={"suppress_tokens": placeholder_ids(model.config)},
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=names_colours, args=args, train_dataset=image_prompts(4),
                              processing_class=processor, peft_config=lora)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert len(rewards) == 8 and all(torch.isfinite(torch.tensor(rewards)))
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.3, rewards  # about 0.1 untrained
