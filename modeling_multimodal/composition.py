"""Compose a multimodal model from pretrained parts: an LM, a vision tower, an audio encoder.

Each part's folder (or Hub id) carries its own preprocessing config, as Hub checkpoints do: the LM
folder its tokenizer (and chat template), a CLIP/SigLIP/ViT/DINOv2 folder its
`preprocessor_config.json`, a Whisper folder its feature extractor. Composition runs in two phases:

1. Configs only: the tokenizer gains the media placeholders, the vision config's `image_size` is set to
   the crop its image processor makes (DINOv2 declares 518 but is used at 224), and the whole
   `MultimodalConfig` and processor are built and checked. A bad combination fails here, in about a
   second, before any weight is read.
2. Weights: the model is built on the meta device and each part is loaded once, then moved in whole
   (no random twin, no copy): the LM (embeddings resized for the placeholders), the vision tower (its
   position table interpolated once to the processor's grid, as the tower itself would interpolate at
   run time), the encoder half of Whisper. Only the projectors and heads are initialised fresh.
"""

from __future__ import annotations

import copy
import os

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor
from transformers.utils import logging

from .configuration import MultimodalConfig
from .configuration.configuration_multimodal import SUPPORTED_AUDIO_TOWERS, SUPPORTED_VISION_TOWERS, tower_half, tower_type_error
from .configuration.media_tokens import VISION_TOWERS_WITH_CLS
from .part_weights import load_part
from .processing import MultimodalImageProcessor, MultimodalProcessor, MultimodalVideoProcessor
from .processing.chat_template import with_generation_markers
from .tokenization import MEDIA_TOKENS

logger = logging.get_logger(__name__)

# The image preprocessing options our processor takes over from a tower's own (and a video processor from the images).
IMAGE_OPTIONS_SHARED_WITH_VIDEO = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std",
)
# The name of each supported vision tower's position table inside its `embeddings` module.
_POSITION_TABLE = {
    "clip_vision_model": "position_embedding.weight",
    "siglip_vision_model": "position_embedding.weight",
    "vit": "position_embeddings",
    "dinov2": "position_embeddings",
}


def check_part_location(role: str, source: str) -> None:
    """A part that is neither an existing folder nor a valid Hub id is named as a missing folder."""
    if os.path.isdir(source):
        return
    try:
        looks_like_path = source.startswith((".", "~", os.sep)) or source.count("/") > 1 or "\\" in source
        validate_repo_id(source)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise ValueError(f"{role}={source!r}: the folder does not exist (and it is not a Hub id either)")


def _part_config(role: str, source: str, supported: tuple[str, ...]):
    """The tower's config (a dual encoder's or whole model's tower half), refused with the reason when unsupported."""
    config = tower_half(AutoConfig.from_pretrained(source))
    refused = tower_type_error(f"{role}_config", config.model_type, supported)
    if refused:
        raise ValueError(f"{role}={source!r} cannot be composed: {refused}")
    return config


def _plain_size(size) -> dict | None:
    """A SizeDict (or dict) as the plain dict of its set entries."""
    return None if size is None else {key: value for key, value in dict(size).items() if value is not None}


def _image_processor(vision: str, image_size: int | None) -> MultimodalImageProcessor:
    """The tower's own preprocessing in our processor: its own class's defaults decide what its config leaves out
    (SigLIP and ViT resize to a square and do not crop; CLIP and DINOv2 resize the short edge, then crop).

    A processor that only resizes the short edge gives images of any aspect ratio, which a fixed patch grid cannot
    take: a centre crop of that edge is added, with a warning. `image_size` sets the side the tower sees (a cropping
    processor's resize edge follows in proportion).
    """
    own = AutoImageProcessor.from_pretrained(vision)
    values = {name: getattr(own, name, None) for name in IMAGE_OPTIONS_SHARED_WITH_VIDEO}
    values.update(size=_plain_size(values["size"]), crop_size=_plain_size(values["crop_size"]), do_center_crop=bool(values["do_center_crop"]))
    size = values["size"] or {}
    if not values["do_center_crop"] and not ("height" in size and "width" in size):
        side = size.get("shortest_edge")
        logger.warning(
            f"{vision}: its image processor ({type(own).__name__}) resizes the shortest edge to {side} without a crop; "
            f"a {side}x{side} centre crop is added so that every image fits the vision tower's patch grid"
        )
        values.update(do_center_crop=True, crop_size={"height": side, "width": side})
    if image_size is not None:
        if values["do_center_crop"]:
            scale = image_size / values["crop_size"]["height"]
            values.update(size={key: round(value * scale) for key, value in size.items()}, crop_size={"height": image_size, "width": image_size})
        else:
            values["size"] = {"height": image_size, "width": image_size}
    return MultimodalImageProcessor(**{key: value for key, value in values.items() if value is not None})


def processed_image_side(image_processor) -> int:
    """The side of the square images the processor outputs (its crop, or its resize when it does not crop)."""
    out = image_processor.crop_size if image_processor.do_center_crop else image_processor.size
    if out.height is None or out.height != out.width:
        raise ValueError(
            f"the image processor must output square images to fit a vision tower's patch grid, got size={dict(out)}; "
            "pass image_size=N to from_pretrained_components"
        )
    return out.height


def fit_vision_tower(tower: nn.Module, image_size: int) -> nn.Module:
    """Re-grid a pretrained vision tower for `image_size` inputs, in place: its position table is interpolated once.

    The table comes from the tower's own `interpolate_pos_encoding` (what `interpolate_pos_encoding=True`, or
    DINOv2 always, computes on every forward), so outputs at `image_size` are unchanged while the config,
    the token count and the saved weights all agree on the new grid.
    """
    config = tower.config
    if config.image_size == image_size:
        return tower
    if image_size % config.patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of the vision tower's patch_size={config.patch_size}")
    table_name, old = _POSITION_TABLE[config.model_type], tower.embeddings
    grid = image_size // config.patch_size
    probe = torch.zeros(1, grid * grid + int(config.model_type in VISION_TOWERS_WITH_CLS), config.hidden_size)
    with torch.no_grad():
        table = old.interpolate_pos_encoding(probe, image_size, image_size)  # (1, positions, hidden)
    state = old.state_dict()
    state[table_name] = table[0] if table_name.endswith(".weight") else table
    config.image_size = image_size
    extra = {"use_mask_token": getattr(old, "mask_token", None) is not None} if config.model_type == "vit" else {}
    new = type(old)(config, **extra)
    new.load_state_dict(state)
    tower.embeddings = new.to(table.dtype)
    return tower


def _materialise_new_modules(model) -> None:
    """Give the modules no part provided (projectors, heads) real memory and their usual initialisation."""
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"composition left tensors without memory: {leftover[:5]}")


def _row_end_from_newline(model, tokenizer) -> None:
    """`image_newline`'s row-end vector starts as the LM's own embedding of "\n" when "\n" is one token: the LM
    already reads it as the end of a line (otherwise it keeps its random start)."""
    projector = model.model.multi_modal_projector["image"] if "image" in model.model.multi_modal_projector else None
    if projector is None or projector.row_end is None:
        return
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        with torch.no_grad():
            projector.row_end.copy_(model.get_input_embeddings().weight[ids[0]].to(projector.row_end.dtype))


def from_pretrained_components(
    cls, text: str, vision: str | None = None, audio: str | None = None, dtype=None, image_size: int | None = None,
    system_prompt: str | None = None, **config_overrides
):
    """(model, processor) from pretrained parts; see the module docstring.

    image_size: the side of the images the vision tower sees; defaults to its image processor's crop.
    system_prompt: the processor's `system_prompt` (None keeps the LM's chat template's own default system turn).
    """
    # 1. configs, tokenizer and preprocessing: everything is checked before a weight is read.
    for role, source in (("text", text), ("vision", vision), ("audio", audio)):
        if source:
            check_part_location(role, source)
    # the towers' types first: an unsupported family is refused from its config alone, with the reason
    native_vision = _part_config("vision", vision, SUPPORTED_VISION_TOWERS) if vision else None
    audio_config = _part_config("audio", audio, SUPPORTED_AUDIO_TOWERS) if audio else None
    tokenizer = AutoTokenizer.from_pretrained(text)
    wanted = (["image", "video"] if vision else []) + (["audio"] if audio else [])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [MEDIA_TOKENS[m] for m in wanted]}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text_config = AutoConfig.from_pretrained(text)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    vision_config = image_processor = video_processor = feature_extractor = None
    if vision:
        image_processor = _image_processor(vision, image_size)
        vision_config = copy.deepcopy(native_vision)
        vision_config.image_size = processed_image_side(image_processor)  # the size the tower's own processor gives
    if audio:
        feature_extractor = WhisperFeatureExtractor.from_pretrained(audio)
    ids = {m: tokenizer.convert_tokens_to_ids(MEDIA_TOKENS[m]) for m in wanted}
    config = MultimodalConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        image_token_id=ids.get("image"),
        video_token_id=ids.get("video"),
        audio_token_id=ids.get("audio"),
        **config_overrides,
    )
    if vision:
        shared = {k: v for k, v in image_processor.to_dict().items() if k in IMAGE_OPTIONS_SHARED_WITH_VIDEO}
        video_processor = MultimodalVideoProcessor(num_frames=config.video_num_frames, **shared)
    processor = MultimodalProcessor.from_config_and_components(
        config, tokenizer, image_processor=image_processor, feature_extractor=feature_extractor, video_processor=video_processor,
        system_prompt=system_prompt,
        # the LM's own template, with `{% generation %}` around the replies (TRL's assistant_only_loss needs them)
        chat_template=_trainable_template(getattr(tokenizer, "chat_template", None)),
    )

    # 2. weights: each part read once and moved into a model built on the meta device; a tower's keys alone are
    # read from its checkpoint (a dual encoder's text half, Whisper's decoder, Qwen2-Audio's LM stay on disk).
    load_dtype = dtype if dtype is not None else torch.float32
    with torch.device("meta"):
        model = cls(config)
    language_model = AutoModelForCausalLM.from_pretrained(text, dtype=load_dtype)
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer))
    model.model.language_model = language_model.base_model
    model.lm_head = language_model.get_output_embeddings()
    if vision:
        # the tower at its checkpoint's own grid, re-gridded once its weights are in
        tower = load_part(type(model.model.vision_tower), native_vision, vision, "vision tower", load_dtype)
        model.model.vision_tower = fit_vision_tower(tower, config.vision_config.image_size)
    if audio:
        tower_class = type(model.model.audio_tower)
        model.model.audio_tower = load_part(tower_class, config.audio_config, audio, "audio encoder", load_dtype)
    _materialise_new_modules(model)
    _row_end_from_newline(model, tokenizer)
    model.model.apply_freezing()
    if dtype is not None:
        model = model.to(dtype)
    for name in ("bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(language_model.generation_config, name, None))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def _trainable_template(template: str | None) -> str | None:
    """The LM's own template with `{% generation %}` around its replies where `with_generation_markers` can place
    them (ChatML-style templates); any other template is kept as it is (TRL's `assistant_only_loss` then needs the
    markers added by hand), since composing must work with every LM's template."""
    try:
        return with_generation_markers(template)
    except ValueError as err:
        logger.info(f"keeping the LM's chat template without generation markers: {err}")
        return template
