"""The model and processor a recipe asks for: a previous run, a checkpoint, pretrained components or a config.

From a config (a model trained from scratch) the tokenizer is trained on the recipe's own rows (prompts,
responses, paired texts, transcripts), so it knows every word the data holds; the config's vocabulary and
special token ids follow that tokenizer. λ and α go into the config before the model is built, because
the auxiliary heads exist only when λ > 0.
"""

from __future__ import annotations

import json

import datasets

from ..configuration import MultimodalConfig
from ..data.examples import build_example, get_task
from ..modeling_multimodal import MultimodalForConditionalGeneration
from ..processing.processing_multimodal import MultimodalProcessor
from ..tokenization import build_tokenizer
from .recipe import TrainingRecipe


def tokenizer_corpus(rows_by_task) -> list[str]:
    """Every text a from-scratch tokenizer must know: prompts, responses, paired texts, chat roles."""
    texts = ["user: assistant: system:"]
    for task, rows in rows_by_task:
        if isinstance(rows, datasets.IterableDataset):
            raise ValueError(
                "model.config trains a model from scratch, whose tokenizer is built from every training row; streamed "
                "data (data.streaming, or an IterableDataset) is not read up front: start from pretrained components "
                "or a checkpoint, or turn streaming off"
            )
        spec = get_task(task)
        if spec is not None:
            texts.append(spec.prompt)
        for row in rows:
            example = build_example(row, task)
            texts += [t for t in (example["response"], example["pair_text"], example["ctc_text"]) if t]
            for message in example["prompt"]:
                content = message["content"]
                texts += [content] if isinstance(content, str) else [i["text"] for i in content if i.get("type") == "text"]
    return texts


def build_model_and_processor(recipe: TrainingRecipe, rows_by_task=()) -> tuple[MultimodalForConditionalGeneration, MultimodalProcessor]:
    """The recipe's model: a previous run (`init_from`), a checkpoint, pretrained components, or a config from scratch."""
    spec = recipe.model
    source = recipe.init_from or spec.checkpoint
    # λ and α go into the config before the model is built: the auxiliary heads exist only when λ > 0.
    loss_weights = {
        name: float(getattr(recipe, name)) for name in ("auxiliary_loss_weight", "contrastive_loss_weight") if getattr(recipe, name) is not None
    }
    overrides = {**spec.overrides, **loss_weights}
    if source:
        model = MultimodalForConditionalGeneration.from_pretrained(source, **overrides)
        processor = MultimodalProcessor.from_pretrained(source)
    elif spec.components is not None:
        model, processor = MultimodalForConditionalGeneration.from_pretrained_components(**spec.components, **overrides)
    else:
        tokenizer_spec = dict(spec.tokenizer or {"kind": "word"})
        tokenizer = build_tokenizer(tokenizer_corpus(rows_by_task), **tokenizer_spec)
        config_values = json.loads(json.dumps(spec.config))  # a deep copy
        text = config_values.setdefault("text_config", {"model_type": "llama"})
        text.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        ids = {m: tokenizer.convert_tokens_to_ids(f"<{m}>") for m in ("image", "audio", "video")}
        if config_values.get("vision_config") is not None:
            config_values.setdefault("image_token_id", ids["image"])
            config_values.setdefault("video_token_id", ids["video"])
        if config_values.get("audio_config") is not None:
            config_values.setdefault("audio_token_id", ids["audio"])
        config = MultimodalConfig(**{**config_values, **loss_weights})
        model = MultimodalForConditionalGeneration(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        processor = MultimodalProcessor.from_config_and_components(config, tokenizer)
    if recipe.stage == "encoders" and model.config.auxiliary_loss_weight <= 0:
        raise ValueError("stage=encoders trains on L_auxiliary alone: set auxiliary_loss_weight (λ) > 0")
    if model.config.auxiliary_loss_weight > 0 and not model.config.active_auxiliary_tasks:
        raise ValueError(
            "auxiliary_loss_weight (λ) > 0 but the model has no auxiliary head (audio_ctc needs an audio tower, media_bow any media tower)"
        )
    return model, processor
