"""MultimodalModel / MultimodalForConditionalGeneration: images, video and audio into any causal LM.

The merge follows LLaVA in three steps per modality: `encode_<modality>` (tower → pool → projector),
`get_placeholder_mask` (from `input_ids`, or by comparing `inputs_embeds` with the placeholder's embedding;
counts checked per sample, a `ValueError` naming the sample and both counts), then `masked_scatter` into
the token embeddings. The checks that read values on the host run at prefill only, never per decode step.
Where it departs from LLaVA:
- audio runs at the clip's own length (see `encoders.encode_audio`), so its cost follows the clip;
- video frames go through the vision tower, then temporal and spatial pooling; a video's own sound track
  (`video_audio_features`, from `use_audio_in_video`) goes through the audio encoder at its own length and its
  tokens are interleaved with the frame tokens by time window (`MediaTokenLayout.video_token_steps`), all at the
  video's `<video>` placeholders;
- the loss is `L_text + λ·L_auxiliary + α·L_contrastive`, each term returned on its own, and `L_text` computes
  logits only at labelled positions (`return_logits=False` skips the full logits entirely);
- retrieval: `get_retrieval_embeddings` gives the L2-normalised embedding of the shared image/video/audio-text
  space (`L_contrastive` trains it). `get_<modality>_features` keep transformers 5.24's layout (LLaVA's for images,
  LLaVA-NeXT-Video's for video, Voxtral's for audio): the tower's output, with the LM-ready features as
  `pooler_output` (per image a list entry, per video a row, audio one (total_tokens, d) tensor whose
  `token_counts` split it by clip); `get_text_features` is the LM's text-only output.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .composition import from_pretrained_components
from .configuration import MultimodalConfig
from .input_checks import check_media_inputs, check_weight_files, holds_quantized_weights
from .configuration.media_registry import PREFILL_ONLY_INPUTS
from .encoders import FEATURES_ONLY, build_audio_tower, encode_audio, encode_audio_layers, run_frozen_aware, select_vision_features
from .losses import AUXILIARY_HEADS, LOSS_TARGETS, MultimodalLoss, RetrievalHead
from .projectors import MultiModalProjector, append_row_ends, compress_patch_grid, pool_time
from .retrieval import RetrievalMixin
from .tiling import TileMarkers, arrange_tiled_images, crops_per_image
from .video_frames import real_frames, video_frame_counts
from .vision_stem import use_conv_stem


class _MediaHiddenStates:
    """`image_hidden_states` / `video_hidden_states` / `audio_hidden_states`: the LM-ready features of each item.

    As LLaVA's (deprecated there) `image_hidden_states`: `<modality>_outputs.pooler_output`.
    """

    @property
    def image_hidden_states(self) -> list[torch.Tensor] | None:
        return None if self.image_outputs is None else self.image_outputs.pooler_output

    @property
    def video_hidden_states(self) -> torch.Tensor | None:
        return None if self.video_outputs is None else self.video_outputs.pooler_output

    @property
    def audio_hidden_states(self) -> torch.Tensor | None:
        return None if self.audio_outputs is None else self.audio_outputs.pooler_output


@dataclass
class AudioFeaturesOutput(BaseModelOutputWithPooling):
    """`get_audio_features`' output: Voxtral's layout, with each clip's token count beside it.

    `pooler_output` (total_tokens, d) holds every clip's LM-ready rows, clip after clip, as Voxtral (and vLLM's
    Transformers backend, which splits it by its own counts) expects; clips run at their own length here, so
    `token_counts` (n,) says how many rows each clip has (`clips()` splits them back).
    """

    token_counts: torch.LongTensor | None = None

    def clips(self) -> list[torch.Tensor]:
        """One (tokens_i, d) tensor per clip."""
        return list(self.pooler_output.split(self.token_counts.tolist()))


@dataclass
class MultimodalModelOutput(_MediaHiddenStates, MultimodalBaseModelOutputWithPast):
    media_mask: torch.Tensor | None = None  # (batch, seq) 1 at every media placeholder (long, like attention_mask)
    inputs_embeds: torch.Tensor | None = None  # (batch, seq, d) the LM's input, media features merged in
    audio_positions: torch.Tensor | None = None  # (n_audios,) real positions of each clip in audio_outputs.last_hidden_state


@dataclass
class MultimodalCausalLMOutput(_MediaHiddenStates, MultimodalCausalLMOutputWithPast):
    loss_text: torch.Tensor | None = None
    loss_auxiliary: torch.Tensor | None = None
    loss_contrastive: torch.Tensor | None = None


def check_placeholder_counts(modality: str, placeholders_per_sample: list[int], tokens_per_item: list[int]) -> None:
    """Media items are consumed in order, sample by sample; each sample's placeholders must match exactly."""
    item = 0
    for sample, expected in enumerate(placeholders_per_sample):
        got = 0
        while got < expected and item < len(tokens_per_item):
            got += tokens_per_item[item]
            item += 1
        if got != expected:
            raise ValueError(
                f"Sample {sample}: {expected} <{modality}> placeholder tokens in input_ids, but the {modality} "
                f"items given for it produce {got} feature tokens. Expand placeholders with the processor "
                f"(MultimodalProcessor), which uses the model's own token counts."
            )
    if item != len(tokens_per_item):
        leftover = sum(tokens_per_item[item:])
        raise ValueError(
            f"{len(tokens_per_item) - item} {modality} item(s) ({leftover} feature tokens) were given but no sample "
            f"has <{modality}> placeholders left for them (placeholders per sample: {placeholders_per_sample})."
        )




def _tower_features(tower, features, output_hidden_states: bool) -> BaseModelOutputWithPooling:
    """A tower's output with the LM-ready `features` as `pooler_output` (hidden states only when asked for)."""
    return BaseModelOutputWithPooling(
        last_hidden_state=tower.last_hidden_state,
        pooler_output=features,
        hidden_states=tower.hidden_states if output_hidden_states else None,
        attentions=tower.attentions,
    )


def _tokens_per_item(features: BaseModelOutputWithPooling) -> list[int]:
    """How many LM-ready rows each item of a `get_<modality>_features` output has (audio: its `token_counts`)."""
    if isinstance(features, AudioFeaturesOutput):
        return features.token_counts.tolist()
    return [item.shape[0] for item in features.pooler_output]


def _flat_features(pooler_output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """(tokens of all items, d) from a list of (tokens_i, d), a (n, tokens, d) or an already flat (tokens, d)."""
    if isinstance(pooler_output, torch.Tensor):
        return pooler_output.reshape(-1, pooler_output.shape[-1])
    return torch.cat(list(pooler_output))


class MultimodalPreTrainedModel(PreTrainedModel):
    config_class = MultimodalConfig
    config: MultimodalConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "audio", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    # Heads a checkpoint may carry that this model does not build: auxiliary heads (trained with λ > 0, loaded with
    # λ = 0), the retrieval head (α = 0 and no `retrieval_head`), and both when the whole checkpoint of
    # `MultimodalForConditionalGeneration` is loaded into `MultimodalModel` (vLLM's `AutoModel`). Not `lm_head`:
    # vLLM drops the keys these patterns match before loading, and it builds its own LM head from `lm_head.weight`.
    _keys_to_ignore_on_load_unexpected = [r"^auxiliary_heads\.", r"^retrieval_head\."]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a local folder's weight files are checked first (`input_checks`)."""
        check_weight_files(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as err:  # a folder or repo written by `quantize` holds no float weights
            if not holds_quantized_weights(pretrained_model_name_or_path, kwargs.get("revision")):
                raise
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} is a quantized checkpoint (written by `quantize`): load it with "
                f"modeling_multimodal.compression.load_quantized({str(pretrained_model_name_or_path)!r})"
            ) from err

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; once registered for an Auto class (the package does so on import),
        the folder also carries the flattened code and `auto_map`, so `trust_remote_code=True` loads it where the
        package is not installed (`hub.custom_code.code_saved_flat`)."""
        # By name, not `from ..hub import`: the packager reads the installed package's sources and is not part of
        # the flattened code it writes; loaded as remote code, there is no package to import it from.
        try:
            hub = importlib.import_module("modeling_multimodal.hub.custom_code")
        except ImportError:  # loaded as remote code: the files are already flat, transformers copies them
            return super().save_pretrained(save_directory, *args, **kwargs)
        with hub.code_saved_flat(self, save_directory, kwargs.get("is_main_process", True)):
            return super().save_pretrained(save_directory, *args, **kwargs)

    def _output_flags(self, output_hidden_states: bool | None, output_attentions: bool | None) -> tuple[bool, bool]:
        """`output_hidden_states` / `output_attentions` from the call, else from the config (as transformers' models)."""
        return (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            self.config.output_attentions if output_attentions is None else output_attentions,
        )

    def _init_weights(self, module):
        super()._init_weights(module)
        if getattr(module, "_torch_default_init", False):  # see projectors.keep_torch_default_init
            module.reset_parameters()
        if isinstance(module, MultiModalProjector):
            module.reset_standardization()
            module.reset_position_embedding()
            if module.row_end is not None:  # as LLaVA-NeXT's image_newline: a random vector of the LM's init scale
                with torch.no_grad():
                    module.row_end.normal_(0.0, getattr(self.config.text_config, "initializer_range", 0.02))
        if isinstance(module, TileMarkers):  # as the row end: random vectors of the LM's init scale
            with torch.no_grad():
                for marker in module.parameters():
                    marker.normal_(0.0, getattr(self.config.text_config, "initializer_range", 0.02))
        if isinstance(module, RetrievalHead):
            with torch.no_grad():
                module.logit_scale.fill_(torch.tensor(1.0 / module.init_temperature).log().item())


class MultimodalModel(MultimodalPreTrainedModel):
    """Towers, projectors and the LM backbone; `forward` merges media into the embeddings and runs the LM."""

    def __init__(self, config: MultimodalConfig):
        super().__init__(config)
        text_hidden = config.text_config.hidden_size
        self.layout = config.token_layout
        self.vision_tower = self.audio_tower = None
        projectors = {}
        if config.vision_config is not None:
            self.vision_tower = AutoModel.from_config(config.vision_config)
            if config.vision_stem == "conv":
                use_conv_stem(self.vision_tower, config.vision_config.patch_size)
            vision_hidden = config.vision_feature_dim
            positions = config.projector_position_embeddings
            projectors["image"] = MultiModalProjector(
                config.image_projector_in_features, text_hidden, config.image_projector, config.projector_hidden_act,
                config.projector_input_standardize, num_positions=self.layout.image_grid_tokens() if positions else 0,
                row_end=config.image_newline, max_tiles=config.image_max_tiles,
            )
            if config.video_token_id is not None and config.video_projector != "image":
                projectors["video"] = MultiModalProjector(
                    vision_hidden, text_hidden, config.video_projector, config.projector_hidden_act,
                    config.projector_input_standardize, num_positions=self.layout.video_tokens_per_step() if positions else 0,
                )
        if config.audio_config is not None:
            self.audio_tower = build_audio_tower(config.audio_config)
            projectors["audio"] = MultiModalProjector(
                config.audio_config.d_model, text_hidden, config.audio_projector, config.projector_hidden_act,
                config.projector_input_standardize,
            )
        self.multi_modal_projector = nn.ModuleDict(projectors)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Set requires_grad from the config's freeze_* flags (towers are frozen by default)."""
        for tower, frozen in (
            (self.vision_tower, self.config.freeze_vision_tower),
            (self.audio_tower, self.config.freeze_audio_tower),
            (self.language_model, self.config.freeze_language_model),
        ):
            if tower is not None:
                tower.requires_grad_(not frozen)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # --- encoders: media -> the tower's output and the per-token LM features --------------------------------
    def _vision_tower_outputs(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        """The vision tower's output with every layer's hidden states (the features read `vision_feature_layers`)."""
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        return run_frozen_aware(
            self.vision_tower,
            self.vision_tower,
            pixel_values=pixel_values,
            output_hidden_states=True,
            output_attentions=output_attentions,
        )

    def _image_tokens(self, tower_hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(crops, crop_tokens, text_hidden) from the vision tower's hidden states: selected layers, compressed
        (`image_token_compression`), projected."""
        drop_cls = self.layout.image_has_cls and not self.layout.image_keep_cls
        features = select_vision_features(tower_hidden_states, self.config.vision_feature_layers, drop_cls)
        features = compress_patch_grid(features, self.config.image_pool_stride, self.config.image_token_compression)
        projector = self.multi_modal_projector["image"]
        tokens = projector(features)
        if projector.row_end is not None:
            tokens = append_row_ends(tokens, self.layout.image_grid_side(), projector.row_end)
        return tokens

    def _tokens_per_image(self, crop_tokens: torch.Tensor, image_tiles: torch.Tensor | None) -> list[torch.Tensor]:
        """One (image_tokens(grid), text_hidden) tensor per image from its crops' tokens (`tiling`); untiled, one crop each."""
        grids = crops_per_image(self.layout, image_tiles, crop_tokens.shape[0])
        if not self.layout.image_max_tiles:
            return list(crop_tokens)
        return arrange_tiled_images(crop_tokens, grids, self.multi_modal_projector["image"].tile_markers)

    def _video_tokens(self, tower_hidden_states: tuple[torch.Tensor, ...], frame_counts: list[int]) -> torch.Tensor | list[torch.Tensor]:
        """(n, video_tokens, text_hidden) from the vision tower's hidden states over every video's real frames; with
        `video_fps` (frame counts per video) a list of (video_tokens(frames_i), text_hidden)."""
        features = select_vision_features(tower_hidden_states, self.config.vision_feature_layers, self.layout.image_has_cls)
        compression = self.config.image_token_compression if self.config.video_projector == "image" else "avg_pool"
        features = compress_patch_grid(features, self.config.video_spatial_pool_stride, compression)  # (frames, patches, d)
        stride = self.config.video_temporal_pool_stride
        steps = features.view(-1, stride, *features.shape[1:]).mean(1)  # (steps, patches, d): no step spans two videos
        tokens = self.video_projector(steps.flatten(0, 1)[None])[0]  # (steps * patches, text_hidden)
        videos = tokens.split([count // stride * steps.shape[1] for count in frame_counts])
        return torch.stack(videos) if self.layout.video_fps is None else list(videos)

    def encode_images(self, pixel_values: torch.Tensor, image_tiles: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """(n, 3, H, W) -> (n, image_tokens, text_hidden), the LM-ready features; tiled (`image_tiles` (n_images, 2),
        `pixel_values` every image's crops), one (image_tokens(grid), text_hidden) tensor per image."""
        tokens = self._image_tokens(self._vision_tower_outputs(pixel_values).hidden_states)
        return tokens if not self.layout.image_max_tiles else self._tokens_per_image(tokens, image_tiles)

    def encode_videos(
        self,
        pixel_values_videos: torch.Tensor,
        video_audio_features: torch.Tensor | None = None,
        video_audio_features_mask: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """(n, frames, 3, H, W) -> (n, video_tokens, text_hidden): frames through the vision tower, then pooled.

        With sound tracks or `video_frames` (see `get_video_features`), a list of (video_tokens_i, text_hidden) instead.
        """
        return self.get_video_features(
            pixel_values_videos, video_audio_features, video_audio_features_mask, video_frames=video_frames, **FEATURES_ONLY
        ).pooler_output

    def _with_sound_tracks(
        self, frame_tokens: torch.Tensor | list[torch.Tensor], video_audio_features: torch.Tensor,
        video_audio_features_mask: torch.Tensor | None, frame_counts: list[int],
    ) -> list[torch.Tensor]:
        """Each video's frame tokens (n, steps * step_tokens, d) with its sound track's tokens interleaved.

        The tracks with at least one mel frame go through the audio encoder together, each at its own length
        (`encode_audio`, padding masked, so a track's tokens do not depend on its batch); a row of length 0 is a
        video without a track. The order is `MediaTokenLayout.video_token_steps`: each temporal step's frame
        tokens, then the track tokens of its time window.
        """
        if self.audio_tower is None:
            raise ValueError("video_audio_features (use_audio_in_video) were given but this model has no audio tower.")
        if video_audio_features_mask is None:
            video_audio_features_mask = video_audio_features.new_ones(video_audio_features.shape[0], video_audio_features.shape[-1])
        if video_audio_features.shape[0] != len(frame_tokens):
            raise ValueError(
                f"video_audio_features has {video_audio_features.shape[0]} rows but there are {len(frame_tokens)} "
                "videos; give one row per video (mask all 0 for a video without its sound track)."
            )
        track_frames = video_audio_features_mask.sum(-1).tolist()
        with_track = [index for index, frames in enumerate(track_frames) if frames > 0]
        tracks = {}
        if with_track:
            rows = torch.tensor(with_track, device=video_audio_features.device)
            clips, _, _ = self.encode_audio(video_audio_features[rows], video_audio_features_mask[rows])
            tracks = dict(zip(with_track, clips))
        videos = []
        for index, frames in enumerate(frame_tokens):
            steps = self.layout.video_token_steps(int(track_frames[index]), frame_counts[index])
            track = tracks.get(index, frames[:0]).to(frames.dtype)
            parts = zip(frames.split([count for count, _ in steps]), track.split([count for _, count in steps]))
            videos.append(torch.cat([part for step in parts for part in step]))  # (video_tokens(track), d)
        return videos

    @property
    def video_projector(self) -> nn.Module:
        """The video projector, or the image projector when `config.video_projector == "image"` (shared)."""
        return self.multi_modal_projector["video" if "video" in self.multi_modal_projector else "image"]

    def encode_audio(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(n, n_mels, T) -> per-clip features [(tokens_i, text_hidden)], encoder states and positions.

        The number of tokens of clip i is `layout.audio_tokens(mel frames of clip i)`.
        """
        input_features, mel_lengths = self._audio_inputs(input_features, input_features_mask)
        states, positions = run_frozen_aware(
            self.audio_tower, encode_audio, self.audio_tower, input_features, mel_lengths, self.config.audio_feature_layer
        )
        return self._project_audio(states, positions), states, positions

    def _audio_inputs(self, input_features, input_features_mask):
        """The features in the tower's dtype and each clip's real mel frames."""
        if input_features_mask is None:
            mel_lengths = torch.full(input_features.shape[:1], input_features.shape[-1], device=input_features.device)
        else:
            mel_lengths = input_features_mask.sum(-1)
        return input_features.to(self.audio_tower.dtype), mel_lengths

    def _project_audio(self, states, positions) -> list[torch.Tensor]:
        pooled, token_counts = pool_time(states, positions, self.config.audio_pool_stride)
        projected = self.multi_modal_projector["audio"](pooled)
        return [projected[i, :count] for i, count in enumerate(token_counts.tolist())]

    # --- get_<modality>_features: transformers 5.24's layout -------------------------------------------
    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_tiles: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """(n, 3, H, W) -> the vision tower's output, with the LM-ready features as `pooler_output`, as LLaVA's.

        `last_hidden_state` (n, patches, vision_hidden), `hidden_states` / `attentions` when asked for, and
        `pooler_output` one (image_tokens, text_hidden) tensor per image: what the LM reads at its placeholders.
        Tiled (`config.image_max_tiles`), `pixel_values` holds every image's crops and `image_tiles` (n_images, 2) each
        image's (rows, cols); the tower's outputs are per crop, `pooler_output` per image (`tiling`).
        """
        hidden, attentions = self._output_flags(output_hidden_states, output_attentions)
        tower = self._vision_tower_outputs(pixel_values, attentions)
        return _tower_features(tower, self._tokens_per_image(self._image_tokens(tower.hidden_states), image_tiles), hidden)

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_audio_features: torch.Tensor | None = None,
        video_audio_features_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        video_frames: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """(n, frames, 3, H, W) -> the vision tower's output over all frames, as LLaVA-NeXT-Video's.

        `last_hidden_state` (n * frames, patches, vision_hidden), `hidden_states` / `attentions` when asked for, and
        `pooler_output` (n, video_tokens, text_hidden) the LM-ready features of each video.
        With `config.video_fps`, `video_frames` (n,) gives each video's real frames (`pixel_values_videos` is padded to
        the longest): only those go through the tower (`last_hidden_state` holds them, video after video) and
        `pooler_output` is a list, one (video_tokens(frames_i), text_hidden) per video.
        With `video_audio_features` (n, n_mels, T) and its mask (n, T), each video's sound track (the processor's
        `use_audio_in_video`; a row whose mask is all 0 is a video without one), `pooler_output` is a list of
        (video_tokens(track mel frames)_i, text_hidden): frame and track tokens interleaved by time window.
        """
        counts = video_frame_counts(self.layout, pixel_values_videos, video_frames)
        hidden, attentions = self._output_flags(output_hidden_states, output_attentions)
        tower = self._vision_tower_outputs(real_frames(pixel_values_videos, counts), attentions)
        features = self._video_tokens(tower.hidden_states, counts)  # (n, video_tokens, text_hidden) or one per video
        if video_audio_features is not None:
            features = self._with_sound_tracks(features, video_audio_features, video_audio_features_mask, counts)
        return _tower_features(tower, features, hidden)

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """(n, n_mels, T) -> the audio encoder's output, with the LM-ready features as `pooler_output` (as Voxtral's).

        `last_hidden_state` (n, positions, audio_hidden) the selected encoder layer, padded past each clip's
        positions; `pooler_output` (total_tokens, text_hidden) every clip's rows one after the other, as Voxtral's,
        each clip as long as the clip itself, with `token_counts` (n,) the rows of each (`output.clips()` splits
        them). With `output_hidden_states` / `output_attentions` (or the config's) the pass runs through every layer
        and keeps them (`encoders.encode_audio_layers`: the embeddings and each layer, N + 1; each layer's attention
        weights under eager attention); otherwise it stops at the selected layer.
        """
        return self._audio_outputs(input_features, input_features_mask, output_hidden_states, output_attentions)[0]

    def _audio_outputs(self, input_features, input_features_mask=None, output_hidden_states=None, output_attentions=None):
        """`get_audio_features`' output and each clip's encoder positions (the CTC head's lengths)."""
        hidden, attentions = self._output_flags(output_hidden_states, output_attentions)
        layers = weights = None
        if hidden or attentions:
            input_features, mel_lengths = self._audio_inputs(input_features, input_features_mask)
            layers, weights, positions = run_frozen_aware(
                self.audio_tower, encode_audio_layers, self.audio_tower, input_features, mel_lengths
            )
            states = layers[self.config.audio_feature_layer]
            clips = self._project_audio(states, positions)
        else:
            clips, states, positions = self.encode_audio(input_features, input_features_mask)
        output = AudioFeaturesOutput(
            last_hidden_state=states,
            pooler_output=torch.cat(clips),  # (total_tokens, text_hidden)
            hidden_states=layers if hidden else None,
            attentions=weights if attentions else None,
            token_counts=torch.tensor([clip.shape[0] for clip in clips], device=states.device),
        )
        return output, positions

    # --- merge ------------------------------------------------------------------------------------
    def encode_media(
        self, pixel_values=None, pixel_values_videos=None, input_features=None, input_features_mask=None,
        video_audio_features=None, video_audio_features_mask=None, image_tiles=None, video_frames=None,
    ):  # fmt: skip
        """{modality: `get_<modality>_features` output} of the media given, and each audio clip's encoder positions
        (None without audio), for the CTC head. Videos' sound tracks belong to the videos (their `<video>` tokens)."""
        outputs, audio_positions = {}, None
        if pixel_values is not None:
            outputs["image"] = self.get_image_features(pixel_values, image_tiles, return_dict=True)
        if pixel_values_videos is not None:
            outputs["video"] = self.get_video_features(
                pixel_values_videos, video_audio_features, video_audio_features_mask, video_frames=video_frames, return_dict=True
            )
        elif video_audio_features is not None:
            raise ValueError("video_audio_features (videos' sound tracks) were given without pixel_values_videos.")
        if input_features is not None:
            outputs["audio"], audio_positions = self._audio_outputs(input_features, input_features_mask)
        return outputs, audio_positions

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        modality: str,
        tokens_per_item: list[int] | None = None,
    ) -> torch.Tensor:
        """(batch, seq) True at the `<modality>` placeholders; with `tokens_per_item`, counts checked per sample.

        Without `input_ids` the placeholders are found as LLaVA finds them: positions whose embedding equals the
        placeholder token's. The count check reads the counts on the host, so it runs only where features are
        merged (prefill), never on a decode step.
        """
        token_id = getattr(self.config, f"{modality}_token_id")
        if input_ids is not None:
            mask = input_ids == token_id
        else:
            placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == placeholder.to(inputs_embeds.dtype)).all(-1)
        if tokens_per_item is not None:
            check_placeholder_counts(modality, mask.sum(-1).tolist(), tokens_per_item)
        return mask

    def _check_token_ids(self, input_ids: torch.LongTensor) -> None:
        """A `ValueError` naming the sample and position of an id outside the embedding table (else an index error)."""
        vocab_size = self.get_input_embeddings().num_embeddings
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        if outside.any():
            sample, position = outside.nonzero()[0].tolist()
            raise ValueError(
                f"input_ids[{sample}, {position}] = {int(input_ids[sample, position])} is outside the vocabulary "
                f"(0..{vocab_size - 1}); was the text tokenized with this model's tokenizer?"
            )

    def merge_media(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        is_prefill: bool = True,
        video_audio_features: torch.Tensor | None = None,
        video_audio_features_mask: torch.Tensor | None = None,
        image_tiles: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
    ) -> MultimodalModelOutput:
        """The LM's input: token embeddings with the media features written at their placeholders.

        Returns a `MultimodalModelOutput` without LM outputs (`last_hidden_state` is None): `inputs_embeds`,
        `media_mask`, each modality's `<modality>_outputs` and the audio encoder's states for the CTC head.
        `forward` runs the LM on it; the `encoders` training stage stops here (the auxiliary heads need no LM).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        check_media_inputs(input_ids, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, input_features=input_features, video_audio_features=video_audio_features)
        for name, value, tower in (
            ("pixel_values", pixel_values, self.vision_tower),
            ("pixel_values_videos", pixel_values_videos, self.vision_tower if self.config.video_token_id is not None else None),
            ("input_features", input_features, self.audio_tower),
            ("video_audio_features", video_audio_features, self.audio_tower),
        ):
            if value is not None and tower is None:
                raise ValueError(f"{name} was given but this model has no tower for it (config.modalities={self.config.modalities}).")
        if input_ids is not None:
            if is_prefill:
                self._check_token_ids(input_ids)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        encoder_outputs, audio_positions = self.encode_media(
            pixel_values, pixel_values_videos, input_features, input_features_mask, video_audio_features,
            video_audio_features_mask, image_tiles, video_frames,
        )
        # Masks first, from the embeddings before any merge (an `inputs_embeds` search must see the placeholders).
        masks = {}
        for modality in self.config.modalities:
            features = encoder_outputs.get(modality)
            counts = None if features is None else _tokens_per_item(features)
            masks[modality] = self.get_placeholder_mask(input_ids, inputs_embeds, modality, counts)
            # Given `inputs_embeds` may be merged already (vLLM merges them itself): then placeholders need no media.
            if features is None and is_prefill and input_ids is not None and masks[modality].any():
                raise ValueError(
                    f"input_ids contain <{modality}> placeholders (samples "
                    f"{masks[modality].any(-1).nonzero().flatten().tolist()}) but no {modality} inputs were given."
                )
        media_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for modality, mask in masks.items():
            media_mask |= mask
            if modality in encoder_outputs:
                flat = _flat_features(encoder_outputs[modality].pooler_output)  # (tokens of all items, d)
                inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], flat.to(inputs_embeds.device, inputs_embeds.dtype))
        return MultimodalModelOutput(
            media_mask=media_mask.long(),
            inputs_embeds=inputs_embeds,
            audio_positions=audio_positions,
            **{f"{modality}_outputs": value for modality, value in encoder_outputs.items()},
        )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        video_audio_features: torch.Tensor | None = None,
        video_audio_features_mask: torch.Tensor | None = None,
        image_tiles: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalModelOutput:
        r"""
        Merge the media features into the token embeddings at their placeholders (`merge_media`) and run the LM.

        input_ids / inputs_embeds: exactly one. With `inputs_embeds`, the placeholders are the positions holding
            the placeholder token's embedding (LLaVA's convention), so `generate(inputs_embeds=..., pixel_values=...)` works.
        cache: the KV cache (`past_key_values` is accepted with a deprecation warning).
        """
        merged = self.merge_media(
            input_ids,
            inputs_embeds,
            pixel_values,
            pixel_values_videos,
            input_features,
            input_features_mask,
            is_prefill=cache is None or cache.get_seq_length() == 0,
            video_audio_features=video_audio_features,
            video_audio_features_mask=video_audio_features_mask,
            image_tiles=image_tiles,
            video_frames=video_frames,
        )
        inputs_embeds = merged.inputs_embeds
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # Left padding: positions count real tokens only, so a sample's output does not depend on its batch.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return MultimodalModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **dict(merged.items()),  # the fields merge_media set, in the dataclass's order
        )


class MultimodalForConditionalGeneration(RetrievalMixin, MultimodalPreTrainedModel, GenerationMixin):
    """The generating model: `MultimodalModel` + LM head + auxiliary heads + retrieval head."""

    def __init__(self, config: MultimodalConfig):
        super().__init__(config)
        self.model = MultimodalModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        heads = {}  # only with λ > 0: a head nobody trains would only cost memory (audio_ctc: d_audio x vocab)
        for task in config.active_auxiliary_tasks if config.auxiliary_loss_weight > 0 else ():
            in_features = config.audio_config.d_model if task == "audio_ctc" else text.hidden_size
            heads[task] = AUXILIARY_HEADS[task](in_features, text.vocab_size)
        self.auxiliary_heads = nn.ModuleDict(heads)
        self.retrieval_head = None  # only with α > 0 or `config.retrieval_head`: never a parameter without a gradient
        if config.builds_retrieval_head:
            self.retrieval_head = RetrievalHead(
                text.hidden_size, config.contrastive_dim or text.hidden_size, config.contrastive_init_temperature
            )
        if config.tie_word_embeddings:
            embeddings = self.model.language_model.get_input_embeddings()
            name = next(n for n, m in self.model.language_model.named_modules() if m is embeddings)
            self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}.weight"}
        self.post_init()
        self.model.apply_freezing()

    @classmethod
    def from_pretrained_components(cls, text: str, vision: str | None = None, audio: str | None = None, dtype=None, **config_overrides):
        """(model, processor) composed from a pretrained LM, vision tower and audio encoder (folders or Hub ids).

        The placeholders are added to the LM's tokenizer and its embeddings resized; each part's own
        preprocessing config (tokenizer, `preprocessor_config.json`, Whisper feature extractor) builds the
        processor. Projectors and heads start fresh. See `modeling_multimodal.composition`.
        """
        return from_pretrained_components(cls, text, vision, audio, dtype, **config_overrides)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    # --- features (transformers' layout) and retrieval embeddings -------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_tiles: torch.Tensor | None = None, **kwargs):
        """As `MultimodalModel.get_image_features`: `pooler_output` holds the LM-ready features of each image."""
        return self.model.get_image_features(pixel_values, image_tiles, **kwargs)

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_audio_features: torch.Tensor | None = None,
        video_audio_features_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """As `MultimodalModel.get_video_features`: `pooler_output` holds the LM-ready features of each video (with
        its sound track interleaved when `video_audio_features` are given)."""
        return self.model.get_video_features(pixel_values_videos, video_audio_features, video_audio_features_mask, **kwargs)

    def get_audio_features(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None, **kwargs):
        """As `MultimodalModel.get_audio_features`: `pooler_output` (total_tokens, d) the clips' LM-ready rows."""
        return self.model.get_audio_features(input_features, input_features_mask, **kwargs)

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """The LM's text-only pass: `last_hidden_state` (n, seq, d), `hidden_states` / `attentions` when asked for;
        `pooler_output` is None (the text's retrieval embedding is `get_retrieval_embeddings(input_ids=...)`)."""
        hidden, attentions = self._output_flags(output_hidden_states, output_attentions)
        outputs = self.model.language_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=hidden,
            output_attentions=attentions,
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def prepare_inputs_for_generation(self, input_ids, cache=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        """As GenerationMixin's, but an empty cache always means a prefill, which keeps the media; the videos' sound
        tracks and images' tile grids are dropped after it, as transformers drops the other media inputs (encoded once, at prefill).

        transformers runs an assistant model's first pass (assisted decoding) with `is_first_iteration=False`,
        which would drop `pixel_values` & co. and leave the assistant placeholders without media.
        """
        is_first_iteration = is_first_iteration or cache is None or cache.get_seq_length() == 0
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration and model_inputs.get("use_cache", True):  # as transformers drops `pixel_values_videos`
            for name in PREFILL_ONLY_INPUTS:
                model_inputs.pop(name, None)
        return model_inputs

    # --- forward ------------------------------------------------------------------------------------
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        video_audio_features: torch.Tensor | None = None,
        video_audio_features_mask: torch.Tensor | None = None,
        image_tiles: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalCausalLMOutput:
        r"""
        video_audio_features / video_audio_features_mask: (n_videos, n_mels, T) / (n_videos, T) each video's sound
            track (the processor's `use_audio_in_video`), interleaved with its frames at its `<video>` placeholders.
        image_tiles: (n_images, 2) each image's (rows, cols) tile grid when `config.image_max_tiles` > 0 (`pixel_values`
            then holds every image's crops: the processor gives both).
        video_frames: (n_videos,) each video's real frames when `config.video_fps` is set (`pixel_values_videos` is
            padded to the longest video).
        labels: (batch, seq) next-token targets, -100 where no loss is taken (prompt, padding, media): `L_text`.

        The loss is `L_text + λ·L_auxiliary + α·L_contrastive` (`losses.MultimodalLoss`, λ = `config.auxiliary_loss_weight`,
        α = `config.contrastive_loss_weight`; a weight of 0 skips its term), each term also returned on its own. Which
        terms are taken follows the targets given, as CLIP's `return_loss` does. Training-only keyword arguments:
        - shift_labels: (batch, seq) targets already shifted (sequence / context parallelism), instead of `labels`;
        - ctc_labels: (n_audios, max_len) transcript ids of each clip, -100 padded: `audio_ctc` of `L_auxiliary`;
        - pair_input_ids / pair_attention_mask: (n_samples, pair_len) the text paired with each sample's media:
          `L_contrastive` and `media_bow`; all-padding rows take no part;
        - segment_ids: (batch, seq) the sample of each position (-1 on padding), for packed rows;
        - num_items_in_batch: the labelled tokens of the accumulation window (as transformers' Trainer passes it),
          or num_items: every term's divisor over the window (`MultimodalLoss`); contrastive=False skips `L_contrastive`;
        - loss_function: a `MultimodalLoss` for this call (world size, touch pass), else the config's;
        - return_logits=False skips the full logits; run_language_model=False merges the media and computes
          `λ·L_auxiliary` only, without running the LM (the `encoders` training stage).
        """
        targets = {key: kwargs.pop(key) for key in LOSS_TARGETS if kwargs.get(key) is not None}
        num_items = kwargs.pop("num_items", None) or {"text": kwargs.pop("num_items_in_batch", None)}
        kwargs.pop("num_items_in_batch", None)
        loss_function = kwargs.pop("loss_function", None) or MultimodalLoss.from_config(self.config)
        contrastive, return_logits = kwargs.pop("contrastive", True), kwargs.pop("return_logits", True)
        run_language_model = kwargs.pop("run_language_model", True)
        if labels is not None:
            targets["labels"] = labels
        length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        for name in ("labels", "shift_labels"):
            if name in targets and targets[name].shape != length:
                raise ValueError(
                    f"{name} has shape {tuple(targets[name].shape)} but the inputs are {tuple(length)} (batch, seq); "
                    f"{name} must hold one target per input position (-100 where no loss is taken)."
                )
        media = dict(
            pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, input_features=input_features,
            input_features_mask=input_features_mask, video_audio_features=video_audio_features,
            video_audio_features_mask=video_audio_features_mask, image_tiles=image_tiles, video_frames=video_frames,
        )
        if run_language_model:
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **media, **kwargs,
            )
        else:
            outputs = self.model.merge_media(input_ids, inputs_embeds, **media)
        logits = None
        if return_logits and outputs.last_hidden_state is not None:
            logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        tracks = video_audio_features_mask
        media_used = {
            "image": pixel_values is not None,
            "video": pixel_values_videos is not None,
            "audio": input_features is not None or bool(tracks is not None and tracks.any()),  # sound tracks use it too
        }
        loss, terms = loss_function(self, outputs, targets, num_items, contrastive=contrastive, media_used=media_used)
        return MultimodalCausalLMOutput(
            loss=loss,
            logits=logits,
            loss_text=terms.text,
            loss_auxiliary=terms.auxiliary_total,
            loss_contrastive=terms.contrastive,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
            audio_outputs=outputs.audio_outputs,
        )


__all__ = ["MultimodalForConditionalGeneration", "MultimodalModel", "MultimodalPreTrainedModel"]
