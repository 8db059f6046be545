"""TRL's preference trainers on our model: audio and video reach the model, not only images.

TRL 1.16's `DPOTrainer` collates vision data with `DataCollatorForVisionPreference`, which renders each prompt to
text and calls the processor with `images=` only, so an `{"type": "audio", ...}` or `{"type": "video", ...}` item
in the prompt becomes a placeholder with no media (`sample 0 has 1 <audio> placeholder(s) but no audio was given`).
`MultimodalPreferenceCollator` is that collator with the prompt's audio and video items passed too, through the
public `data_collator=` argument:

    trl.DPOTrainer(model, args, train_dataset=rows, processing_class=processor, peft_config=lora,
                   data_collator=MultimodalPreferenceCollator(processor))

Rows: `images` (for the `{"type": "image"}` slots), `prompt` (messages whose content lists may hold audio and video
items with a path or array under "audio" / "video" / "path"), `chosen`, `rejected`. Images, TRL's only vision
modality, are left to TRL.
"""

from __future__ import annotations

from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

# (our processor's argument, the content item type)
_EXTRA_MEDIA = (("audio", "audio"), ("videos", "video"))


def _prompt_media(prompt, kind: str) -> list:
    """The `kind` items of a prompt's messages, in order, as the values the processor takes."""
    items = [item for message in prompt if isinstance(message.get("content"), list) for item in message["content"]]
    return [next(item[key] for key in (kind, "path", "url") if key in item) for item in items if item.get("type") == kind]


class _WithPromptMedia:
    """Our processor, with `media` added to the one call that carries `images=` (the prompts' call)."""

    def __init__(self, processor, media: dict):
        self._processor, self._media = processor, media

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        if "images" in kwargs:
            kwargs.update(self._media)
        return self._processor(*args, **kwargs)


class MultimodalPreferenceCollator(DataCollatorForVisionPreference):
    """`DataCollatorForVisionPreference` that also passes each prompt's audio and video items to the processor."""

    def torch_call(self, examples):
        media = {}
        for argument, kind in _EXTRA_MEDIA:
            per_example = [_prompt_media(example["prompt"], kind) for example in examples]
            if any(per_example):
                media[argument] = [item for items in per_example * 2 for item in items]  # prompts repeat: chosen, rejected
        processor = self.processor
        self.processor = _WithPromptMedia(processor, media)
        try:
            return super().torch_call(examples)
        finally:
            self.processor = processor
