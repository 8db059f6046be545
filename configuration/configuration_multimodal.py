"""MultimodalConfig: one causal LM plus optional vision (images and video) and audio towers.

Like `LlavaConfig` / `Qwen2AudioConfig`, it is a composite config whose sub-configs are resolved
through `AutoConfig`, so any causal LM, any CLIP/SigLIP/ViT/DINOv2 vision tower and any
Whisper-style audio encoder that transformers knows can be plugged in. Every modality is optional;
invalid combinations raise a `ValueError` at construction rather than deep inside `forward`.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .media_tokens import MediaTokenLayout

SUPPORTED_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model", "vit", "dinov2")
SUPPORTED_AUDIO_TOWERS = ("whisper", "qwen2_audio_encoder")
# Composite configs whose vision or audio half we take when a user passes the whole thing.
VISION_HALF_OF = {"clip": "vision_config", "siglip": "vision_config"}
AUDIO_HALF_OF = {"qwen2_audio": "audio_config"}
# Tower families refused from their config, with the reason (docs/MODEL.md, "Composition").
REFUSED_TOWERS = {
    "siglip2_vision_model": (
        "SigLIP2 (NaFlex) gives every image its own patch grid (aspect ratio kept, up to max_num_patches) and takes "
        "flattened patches with spatial_shapes and a patch mask, while the token layout here gives every image of a "
        "tower one fixed grid; use a fixed-resolution SigLIP (model_type 'siglip' / 'siglip_vision_model')"
    ),
    "wav2vec2": (
        "Wav2Vec2 is a raw-waveform encoder (input_values through a strided convolution stack, its own feature "
        "extractor and length rule), while the audio path here feeds log-mel input_features to a Whisper-style "
        "encoder; use a Whisper or Qwen2-Audio encoder"
    ),
}
REFUSED_TOWERS["siglip2"] = REFUSED_TOWERS["siglip2_vision_model"]
REFUSED_TOWERS["hubert"] = REFUSED_TOWERS["wav2vec2"].replace("Wav2Vec2 is", "HuBERT is")


def tower_type_error(field: str, model_type: str, supported: tuple[str, ...]) -> str | None:
    """Why a `field` (vision_config / audio_config) of `model_type` cannot be used; None when it can."""
    if model_type in supported:
        return None
    reason = REFUSED_TOWERS.get(model_type, f"supported: {supported}")
    return f"{field}.model_type={model_type!r}: {reason}"


def tower_half(config: PreTrainedConfig) -> PreTrainedConfig:
    """A whole CLIP / SigLIP / Qwen2-Audio config's vision or audio half; any other config as it is."""
    halves = {**VISION_HALF_OF, **AUDIO_HALF_OF}
    return getattr(config, halves[config.model_type]) if config.model_type in halves else config
PROJECTOR_TYPES = ("linear", "mlp")
IMAGE_TOKEN_COMPRESSIONS = ("avg_pool", "pixel_shuffle")  # projectors.PATCH_GRID_COMPRESSIONS' keys
VISION_STEMS = ("patch", "conv")
AUXILIARY_TASKS = ("audio_ctc", "media_bow")
# Old config keys -> their current names. Saved configs and call sites with the old keys still work (FutureWarning).
DEPRECATED_NAMES = {"other_loss_weight": "auxiliary_loss_weight", "cross_loss_weight": "contrastive_loss_weight"}
# Keys every config.json this package has written holds (since its first version) when the tower is there: a
# saved config without one was damaged, and its class default may not be what the weights were trained with.
SAVED_TOWER_KEYS = {"vision_config": ("vision_feature_layer",), "audio_config": ("audio_feature_layer",)}


class MultimodalConfig(PreTrainedConfig):
    r"""
    Configuration of [`MultimodalForConditionalGeneration`].

    Args:
        text_config: config of the causal LM (any `AutoModelForCausalLM` type).
        vision_config: config of the vision tower (CLIP/SigLIP vision, ViT, DINOv2); it also encodes video frames.
        audio_config: config of the audio encoder (Whisper or Qwen2-Audio encoder).
        image_token_id / audio_token_id / video_token_id: ids of the placeholder tokens in the tokenizer.
        vision_stem: "patch" keeps the tower's own patch embedding (one strided convolution); "conv" replaces it by a
            stack of 3x3 stride-2 convolutions (`vision_stem.ConvPatchStem`) that sees shapes the same way wherever
            they fall on the patch grid, for towers trained from scratch. Needs a power-of-two patch size.
        vision_feature_layer: hidden-state index of the vision tower used as features (LLaVA uses -2), or a list of
            indices whose states are concatenated along the feature axis (as LLaVA-NeXT allows): an early layer keeps
            the colour and local detail that the last layers of a tower trained with colour augmentation (DINOv2) drop.
        vision_feature_select_strategy: "default" drops the CLS token, "full" keeps it.
        audio_feature_layer: hidden-state index of the audio encoder (-1: the final, layer-normed output).
        image_projector / audio_projector / video_projector: "linear" or "mlp" (two layers); video_projector may
            also be "image": video frames go through the image projector (one projector for both, as in
            LLaVA-NeXT-Video), so what the LM learns to read from images carries over to frames.
        projector_input_standardize: standardise each projector's input per channel with a mean and standard
            deviation estimated from training data when training starts (`training.calibration`), saved with the
            model. For pretrained towers, whose features a fresh projector otherwise learns to read slowly.
        projector_position_embeddings: a learned table with one vector per token of a pooled patch grid, added to the
            projected tokens of every image (and of every video time step), zero when training starts. The LM then
            reads where a token lies in the image from the token itself rather than from its place in the sequence;
            a tower whose last layers keep little position (DINOv2) otherwise leaves position and motion to be
            learnt slowly (docs/EXPERIMENTS.md). With `video_projector="image"` a frame's grid must equal an image's.
        image_newline: a learned row-end vector (LLaVA-NeXT's `image_newline`) after each row of an image's pooled
            grid, so the LM reads an image as lines of tokens: a token's column is its distance from the last row
            end, which rotary positions express directly, instead of its index modulo the row length. One more
            token per row. Composed on a pretrained LM it starts as the LM's own embedding of "\n".
        image_pool_stride: shrink the image patch grid by this factor per side (token compression), as
            `image_token_compression` says.
        image_token_compression: "avg_pool" averages each stride x stride block of patches into one token;
            "pixel_shuffle" (space-to-depth, SmolVLM / nanoVLM) concatenates the block's features into one token of
            stride^2 times the width, so the projector sees every feature. Same token count either way. With
            `video_projector="image"` video frames are compressed the same way (then video_spatial_pool_stride must
            equal image_pool_stride, so frame and image tokens have one width).
        image_max_tiles: 0 (default) runs each image as one square at the tower's size. N > 0 tiles it: a grid of
            rows x cols crops (rows * cols <= N) of the tower's size, chosen from the image's size and aspect ratio
            as LLaVA-NeXT's best fit does (`media_tokens.best_tile_grid`), plus one global view of the whole image;
            an image that one crop holds gets the global view alone. A learned marker token before each crop says
            which it is (global, or tile row r / column c), so each image costs `MediaTokenLayout.image_tokens(grid)`.
        audio_pool_stride: average-pool audio encoder positions in time by this factor.
        video_num_frames: frames sampled per video (fixed, so a video's token count is fixed); with `video_fps`, the
            most frames a video keeps.
        video_fps: None (default) samples `video_num_frames` frames uniformly from every video. A rate (frames per
            second) samples each video at that rate, so a longer video keeps more frames: up to `video_num_frames`,
            in whole time steps of `video_temporal_pool_stride` frames (`media_tokens.frames_at_rate`); the processor
            gives each video's count as `video_frames`, and a video's tokens follow it.
        video_timestamps: the processor writes each time step's time as text, "<t=1.5s>", before that step's tokens
            (Qwen2.5-VL / SmolVLM2 give frames their time as text), so the LM can answer when something happens.
        video_temporal_pool_stride / video_spatial_pool_stride: pooling of video frame features.
        auxiliary_loss_weight: λ, the weight of the auxiliary loss (the auxiliary tasks' heads, e.g. audio CTC).
        contrastive_loss_weight: α, the weight of the contrastive media-text loss (InfoNCE in the retrieval space).
            `other_loss_weight` / `cross_loss_weight` are their deprecated names (still read, with a FutureWarning).
        auxiliary_tasks: auxiliary heads to build, from `AUXILIARY_TASKS` ("audio_ctc": CTC transcription on the
            audio encoder; "media_bow": the paired text's bag of words from the pooled media tokens); those whose
            modality is absent are skipped.
        contrastive_dim: size of the shared retrieval space (defaults to the LM hidden size).
        retrieval_head: build the retrieval head (`get_retrieval_embeddings`) even with contrastive_loss_weight 0,
            e.g. to keep a checkpoint's head trained with α > 0 after fine-tuning with α = 0; with α > 0 it is always built.
        contrastive_init_temperature: initial temperature of the InfoNCE loss (learnable).
        freeze_vision_tower / freeze_audio_tower / freeze_language_model: set `requires_grad=False` at init.
    """

    model_type = "modeling_multimodal"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    audio_token_id: int | None = None
    video_token_id: int | None = None
    vision_stem: str = "patch"
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    audio_feature_layer: int = -1
    image_projector: str = "mlp"
    audio_projector: str = "mlp"
    video_projector: str = "mlp"
    projector_hidden_act: str = "gelu"
    projector_input_standardize: bool = False
    projector_position_embeddings: bool = False
    image_newline: bool = False
    image_pool_stride: int = 1
    image_token_compression: Literal["avg_pool", "pixel_shuffle"] = "avg_pool"
    image_max_tiles: int = 0
    audio_pool_stride: int = 2
    video_num_frames: int = 8
    video_fps: float | int | None = None
    video_timestamps: bool = False
    video_temporal_pool_stride: int = 1
    video_spatial_pool_stride: int = 2
    auxiliary_loss_weight: float | int = 0.0
    contrastive_loss_weight: float | int = 0.0
    auxiliary_tasks: list[str] | tuple[str, ...] = ("audio_ctc",)
    contrastive_dim: int | None = None
    retrieval_head: bool = False
    contrastive_init_temperature: float = 0.07
    freeze_vision_tower: bool = True
    freeze_audio_tower: bool = True
    freeze_language_model: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for old, new in DEPRECATED_NAMES.items():
            if old in kwargs:
                warnings.warn(f"MultimodalConfig: {old} is deprecated, use {new}", FutureWarning, stacklevel=3)
                setattr(self, new, kwargs.pop(old))
        # Accept a whole CLIPConfig / SiglipConfig / Qwen2AudioConfig and keep its vision or audio half.
        for name in ("vision_config", "audio_config"):
            if isinstance(getattr(self, name), PreTrainedConfig):
                setattr(self, name, tower_half(getattr(self, name)))
        super().__post_init__(**kwargs)
        if self.text_config.tie_word_embeddings and not self.tie_word_embeddings:
            self.tie_word_embeddings = True
        self.auxiliary_tasks = list(self.auxiliary_tasks)
        self._check()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """The saved config's dict, refused unless it is a whole multimodal config (see `check_saved_config`)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        check_saved_config(config_dict, pretrained_model_name_or_path)
        return config_dict, kwargs

    # ---------------------------------------------------------------------------------------------
    def _check(self) -> None:
        """Reject combinations that cannot work, with a message that says what to change."""
        errors = []
        if self.vision_config is not None:
            refused = tower_type_error("vision_config", self.vision_config.model_type, SUPPORTED_VISION_TOWERS)
            if refused:
                errors.append(refused)
            else:
                grid = self.vision_config.image_size // self.vision_config.patch_size
                if grid % self.image_pool_stride:
                    errors.append(f"image_pool_stride={self.image_pool_stride} must divide the patch grid ({grid})")
                if grid % self.video_spatial_pool_stride:
                    errors.append(
                        f"video_spatial_pool_stride={self.video_spatial_pool_stride} must divide the patch grid ({grid})"
                    )
                if self.vision_feature_select_strategy == "full" and self.image_pool_stride != 1:
                    errors.append("vision_feature_select_strategy='full' keeps CLS and cannot be pooled; use 'default'")
                patch = self.vision_config.patch_size
                if self.vision_stem == "conv" and (patch < 2 or patch & (patch - 1)):
                    errors.append(f"vision_stem='conv' needs a power-of-two patch_size >= 2, got {patch}")
                n_hidden = self.vision_config.num_hidden_layers + 1
                layers = self.vision_feature_layers
                if not layers or not all(-n_hidden <= layer < n_hidden for layer in layers):
                    errors.append(f"vision_feature_layer={self.vision_feature_layer} is outside [-{n_hidden}, {n_hidden})")
            if self.image_token_id is None:
                errors.append("a vision tower is configured but image_token_id is None")
        for name in ("image_token_id", "video_token_id"):
            if getattr(self, name) is not None and self.vision_config is None:
                errors.append(f"{name} is set but there is no vision_config (images and video use the vision tower)")
        if self.video_token_id is not None:
            if self.video_num_frames < 1 or self.video_num_frames % self.video_temporal_pool_stride:
                errors.append(
                    f"video_temporal_pool_stride={self.video_temporal_pool_stride} must divide "
                    f"video_num_frames={self.video_num_frames} (>= 1)"
                )
            elif self.projector_position_embeddings and self.video_projector == "image" and self.vision_config is not None and not errors:
                layout = self.token_layout
                if layout.video_tokens_per_step() != layout.image_grid_tokens():
                    errors.append(
                        f"projector_position_embeddings with video_projector='image' needs a frame's grid to equal an "
                        f"image's, but a frame has {layout.video_tokens_per_step()} tokens and an image "
                        f"{layout.image_grid_tokens()}; set video_spatial_pool_stride=image_pool_stride or use a video projector"
                    )
        if self.audio_config is not None:
            refused = tower_type_error("audio_config", self.audio_config.model_type, SUPPORTED_AUDIO_TOWERS)
            if refused:
                errors.append(refused)
            else:
                n_hidden = self.audio_config.encoder_layers + 1
                if not -n_hidden <= self.audio_feature_layer < n_hidden:
                    errors.append(f"audio_feature_layer={self.audio_feature_layer} is outside [-{n_hidden}, {n_hidden})")
            if self.audio_token_id is None:
                errors.append("an audio tower is configured but audio_token_id is None")
        elif self.audio_token_id is not None:
            errors.append("audio_token_id is set but there is no audio_config")
        ids = [i for i in (self.image_token_id, self.audio_token_id, self.video_token_id) if i is not None]
        if len(ids) != len(set(ids)):
            errors.append(f"image/audio/video token ids must differ, got {ids}")
        for token_id in ids:
            if not 0 <= token_id < self.text_config.vocab_size:
                errors.append(f"media token id {token_id} is outside the LM vocabulary ({self.text_config.vocab_size})")
        for name, allowed in (
            ("vision_stem", VISION_STEMS),
            ("image_projector", PROJECTOR_TYPES), ("audio_projector", PROJECTOR_TYPES), ("video_projector", (*PROJECTOR_TYPES, "image"))
        ):
            if getattr(self, name) not in allowed:
                errors.append(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.image_token_compression not in IMAGE_TOKEN_COMPRESSIONS:
            errors.append(f"image_token_compression={self.image_token_compression!r}; expected one of {IMAGE_TOKEN_COMPRESSIONS}")
        elif (
            self.image_token_compression == "pixel_shuffle" and self.video_projector == "image"
            and self.video_token_id is not None and self.video_spatial_pool_stride != self.image_pool_stride
        ):
            errors.append(
                f"image_token_compression='pixel_shuffle' with video_projector='image' needs video_spatial_pool_stride "
                f"({self.video_spatial_pool_stride}) = image_pool_stride ({self.image_pool_stride}): frames go through the "
                "image projector, whose input is stride^2 x the feature width"
            )
        if self.video_fps is not None and not (isinstance(self.video_fps, (int, float)) and 0 < self.video_fps < float("inf")):
            errors.append(f"video_fps must be a positive number of frames per second or None, got {self.video_fps!r}")
        if not isinstance(self.image_max_tiles, int) or self.image_max_tiles < 0:
            errors.append(f"image_max_tiles must be an integer >= 0 (0: no tiling), got {self.image_max_tiles!r}")
        for name in ("image_pool_stride", "audio_pool_stride", "video_temporal_pool_stride", "video_spatial_pool_stride"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.auxiliary_loss_weight < 0 or self.contrastive_loss_weight < 0:
            errors.append("auxiliary_loss_weight (λ) and contrastive_loss_weight (α) must be >= 0")
        unknown = [task for task in self.auxiliary_tasks if task not in AUXILIARY_TASKS]
        if unknown:
            errors.append(f"unknown auxiliary_tasks {unknown}; known: {AUXILIARY_TASKS}")
        if self.auxiliary_loss_weight > 0 and not self.active_auxiliary_tasks:
            errors.append(
                "auxiliary_loss_weight (λ) > 0 but no auxiliary task applies (audio_ctc needs an audio_config, media_bow any media tower)"
            )
        if self.contrastive_loss_weight > 0 and self.vision_config is None and self.audio_config is None:
            errors.append("contrastive_loss_weight (α) > 0 needs at least one media tower to align with text")
        if self.contrastive_init_temperature <= 0:
            errors.append("contrastive_init_temperature must be > 0")
        if errors:
            raise ValueError("Invalid MultimodalConfig:\n  - " + "\n  - ".join(errors))

    @property
    def vision_feature_layers(self) -> list[int]:
        """`vision_feature_layer` as a list (one index or several, concatenated)."""
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def vision_feature_dim(self) -> int:
        """Width of the vision features the image / video projectors receive."""
        return self.vision_config.hidden_size * len(self.vision_feature_layers)

    @property
    def image_projector_in_features(self) -> int:
        """Width of one compressed image token (the image projector's input): `vision_feature_dim`, times
        image_pool_stride^2 with pixel shuffle."""
        if self.image_token_compression == "pixel_shuffle":
            return self.vision_feature_dim * self.image_pool_stride**2
        return self.vision_feature_dim

    @property
    def builds_retrieval_head(self) -> bool:
        """The retrieval head exists with α > 0 (it is trained) or when asked for (`retrieval_head=True`)."""
        return self.contrastive_loss_weight > 0 or bool(self.retrieval_head)

    @property
    def active_auxiliary_tasks(self) -> list[str]:
        """Auxiliary tasks whose modality this model has."""
        has_media = self.vision_config is not None or self.audio_config is not None
        applies = {"audio_ctc": self.audio_config is not None, "media_bow": has_media}
        return [task for task in self.auxiliary_tasks if applies.get(task, False)]

    @property
    def token_layout(self) -> MediaTokenLayout:
        """The numbers that decide each media item's token count (shared with the processor)."""
        return MediaTokenLayout.from_config(self)

    @property
    def modalities(self) -> list[str]:
        found = []
        if self.image_token_id is not None:
            found.append("image")
        if self.video_token_id is not None:
            found.append("video")
        if self.audio_token_id is not None:
            found.append("audio")
        return found


def check_saved_config(config_dict: dict, source) -> None:
    """Refuse a saved config that is not a whole `MultimodalConfig`, before any model is built from it.

    transformers' own loading turns each of these into something quietly wrong: a folder with no config.json
    (a training `checkpoint-N/`, an adapter folder) gives `{}` and so the default config (a 6.7B Llama), an
    unknown or foreign `model_type` only logs a warning, a missing `text_config` falls back to the default Llama,
    and a missing tower key to the class default.
    """
    where = f"{source}/config.json" if os.path.isdir(str(source)) else f"the config of {str(source)!r}"
    if not config_dict:
        raise ValueError(f"{source!s} has no config.json (or an empty one): it is not a saved multimodal model")
    model_type = config_dict.get("model_type")
    if model_type != MultimodalConfig.model_type:
        raise ValueError(
            f"{where} has model_type={model_type!r}, expected {MultimodalConfig.model_type!r}: "
            "not a multimodal checkpoint (a plain language model is composed with towers through a recipe's model.components)"
        )
    if not isinstance(config_dict.get("text_config"), dict):
        raise ValueError(f"{where} has no text_config: the language model's config is missing, so its size and weights are unknown")
    for tower, keys in SAVED_TOWER_KEYS.items():
        missing = [key for key in keys if config_dict.get(tower) is not None and key not in config_dict]
        if missing:
            raise ValueError(
                f"{where} has a {tower} but no {', '.join(missing)}; every config this package saves records it, "
                "so the file was edited or damaged: put the value the model was trained with back"
            )


__all__ = ["MultimodalConfig", "check_saved_config"]
