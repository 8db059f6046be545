"""MultimodalProcessor: text with `<image>`/`<audio>`/`<video>` placeholders plus media -> the model's inputs.

- Every placeholder is expanded to exactly the number of tokens the model produces for that item,
  computed by `MediaTokenLayout` (the model checks its placeholders with the same functions). The
  layout is saved in `processor_config.json` as `token_layout`; build a processor that agrees with
  a model with `MultimodalProcessor.from_config_and_components(config, tokenizer)`.
- Audio keeps its own length: each clip's log-mel is computed alone (no 30 s padding), then the
  batch is right-padded with zeros and `input_features_mask` marks the real mel frames.
- Everything is checked (placeholder counts, files, arrays, modalities, lengths) before anything is
  returned, and errors name the sample, the item and the file.
- `use_audio_in_video=True` (or one bool per video) also decodes each video file's sound track, fitted to the
  span of its sampled frames (`audio_loading.load_video_track`); its `<video>` placeholder then stands for the
  frame tokens and the track's tokens interleaved by time window (`MediaTokenLayout.video_token_steps`).
- Truncation never cuts a media span (`truncation.py`): it raises instead, or, in `apply_chat_template`
  (`chat_template.py`), drops whole trailing turns when `drop_trailing_turns=True`.

Outputs (names of the model's `forward` arguments):
    input_ids, attention_mask          (batch, seq)
    pixel_values                       (n_images, 3, H, W)           all images, sample 0's first (tiled: all crops)
    image_tiles                        (n_images, 2)                 only with image_max_tiles > 0: (rows, cols) per image
    input_features                     (n_audios, n_mels, T_max)     zero-padded log-mels
    input_features_mask                (n_audios, T_max)             1 = real mel frame
    pixel_values_videos                (n_videos, num_frames, 3, H, W)  with video_fps: zero-padded to the longest video
    video_frames                       (n_videos,)                   only with video_fps: each video's real frames
    video_audio_features               (n_videos, n_mels, T_max)     with use_audio_in_video: each video's sound track
    video_audio_features_mask          (n_videos, T_max)             1 = real mel frame; all 0 for a video without track
    video_metadata                     only with return_metadata=True: list of `SampledVideoMetadata`
    assistant_masks                    only from apply_chat_template(..., return_assistant_tokens_mask=True)
"""

import importlib
import os

import numpy as np
import torch
from transformers import WhisperFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import AudioKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack
from transformers.utils import logging
from transformers.video_processing_utils import VideoProcessorMixin

from ..configuration.media_tokens import MODALITIES, MediaTokenLayout
from .audio_loading import SoundTrackRequest, load_audio, log_mel, mel_frame_count, pad_log_mels
from .chat_template import ASSISTANT_PREFIX, DEFAULT_CHAT_TEMPLATE, ChatTemplateMixin, with_media_parts_as_placeholders
from .image_processing_multimodal import MediaInputError, MultimodalImageProcessor, describe
from .media_batch import assign_media, flags_per_video, locate, with_frame_rates
from .truncation import truncate_outside_media
from .video_processing_multimodal import MultimodalVideoProcessor, MultimodalVideosKwargs

logger = logging.get_logger(__name__)

# Image normalisation of the vision towers `MultimodalConfig` supports (what their own processors use).
_CLIP = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
_HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
VISION_NORMALIZATION = {"clip_vision_model": _CLIP, "siglip_vision_model": _HALF, "vit": _HALF, "dinov2": _IMAGENET}


class MultimodalAudioKwargs(AudioKwargs, total=False):
    """`AudioKwargs` plus `truncate_audio` (keep the first frames the encoder takes instead of raising) and
    `audio_at_feature_rate` (raw arrays without `sampling_rate` are at the feature extractor's rate)."""

    sampling_rate: int | float | None  # checked (and a fractional rate refused, naming it) by `load_audio`
    truncate_audio: bool | None
    audio_at_feature_rate: bool | None


class MultimodalProcessorVideosKwargs(MultimodalVideosKwargs, total=False):
    """The video processor's options plus `use_audio_in_video`: True for every video of the call, or one bool per
    video (flat, in placeholder order), to read each video file's sound track along with its frames."""

    use_audio_in_video: bool | list[bool] | None


class MultimodalProcessorKwargs(ProcessingKwargs, total=False):
    """What `MultimodalProcessor.__call__` takes, flat (`do_rescale=False`, `padding="longest"`) or grouped
    (`text_kwargs=`, `images_kwargs=`, `audio_kwargs=`, `videos_kwargs=`, `common_kwargs=`), routed by
    `ProcessorMixin._merge_kwargs` as in transformers' own processors (the image and video processors' own
    `valid_kwargs` included, e.g. `max_image_pixels`, `do_sample_frames`)."""

    text_kwargs: TextKwargs
    audio_kwargs: MultimodalAudioKwargs
    videos_kwargs: MultimodalProcessorVideosKwargs


def timestamp_text(seconds: float) -> str:
    """The text a video time step's tokens follow with `video_timestamps`: "<t=1.5s>" (tenths of a second)."""
    return f"<t={seconds:.1f}s>"


KWARGS_GROUPS = {"image": "images_kwargs", "audio": "audio_kwargs", "video": "videos_kwargs"}
# Each sub-processor and the modality it serves (the audio of videos' sound tracks needs the audio tower too).
COMPONENT_MODALITY = {"image_processor": "image", "feature_extractor": "audio", "video_processor": "video"}
COMPONENT_DEFAULTS = {
    "image_processor": MultimodalImageProcessor,
    "feature_extractor": WhisperFeatureExtractor,
    "video_processor": MultimodalVideoProcessor,
}


def layout_modalities(layout: MediaTokenLayout) -> list[str]:
    """The media kinds a token layout has towers for, in `MODALITIES` order (video needs the vision tower)."""
    present = {
        "image": layout.image_grid is not None,
        "audio": layout.audio_max_positions is not None,
        "video": layout.image_grid is not None and layout.video_num_frames > 0,
    }
    return [kind for kind in MODALITIES if present[kind]]


class _PresentComponents:
    """`get_attributes`: on the class, every component the processor can take (what `from_pretrained` passes, `None`
    for an absent one); on an instance, the components it has (what `ProcessorMixin` checks, saves and prints)."""

    def __get__(self, instance, owner):
        if instance is None or "_components" not in vars(instance):
            return lambda: ["tokenizer", *COMPONENT_MODALITY]
        return lambda: list(instance._components)


class MultimodalProcessor(ChatTemplateMixin):
    r"""
    Tokenizer + image processor + Whisper feature extractor + video processor, with token counts from `MediaTokenLayout`.

    Build it from a model config (recommended; components default to what the towers expect):
        `MultimodalProcessor.from_config_and_components(config, tokenizer, image_processor=None,
        feature_extractor=None, video_processor=None, chat_template=None)`
    or directly, `MultimodalProcessor(tokenizer, image_processor, feature_extractor, video_processor,
    token_layout=layout.to_dict())`. Save/load with `save_pretrained` / `from_pretrained` / `AutoProcessor`.

    Args:
        tokenizer: must know the placeholder tokens of the modalities the layout has.
        image_processor (`MultimodalImageProcessor`, *optional*): defaults to CLIP's settings.
        feature_extractor (`WhisperFeatureExtractor`, *optional*): defaults to 80 mel bins, 16 kHz.
        video_processor (`MultimodalVideoProcessor`, *optional*): its `num_frames` is overridden by the layout's.
        token_layout (`dict`): `MediaTokenLayout.to_dict()`; the single source of each item's token count.
        chat_template (`str`, *optional*): defaults to the tokenizer's own chat template (SmolLM2's, Qwen's ChatML ...),
            or `DEFAULT_CHAT_TEMPLATE` when it has none; pass `DEFAULT_CHAT_TEMPLATE` to use the package's template.
        image_token / audio_token / video_token (`str`): the placeholders.
        system_prompt (`str`, *optional*): the system turn `apply_chat_template` puts first in a conversation that has
            none. `None` leaves the template's own behaviour (SmolLM2's and Qwen's templates then write their default
            system prompt, 16 tokens in SmolLM2's case, into every sample); `""` gives an empty system turn. Saved with
            the processor, so training, evaluation and inference render the same prompt.
        audio_at_feature_rate (`bool`, defaults to `False`): raw audio arrays given without `sampling_rate` are taken to
            be at the feature extractor's rate instead of refused (vLLM resamples audio itself and passes no rate:
            `mm_processor_kwargs={"audio_at_feature_rate": True}`). Off by default because a clip at another rate
            would silently give wrong features. Saved with the processor.
    """

    valid_processor_kwargs = MultimodalProcessorKwargs
    get_attributes = _PresentComponents()
    # Defaults, lowest priority (the tokenizer's own init kwargs and the call's arguments override them).
    text_kwargs = {"padding": True, "return_tensors": "pt"}

    def __init__(
        self,
        tokenizer=None,
        image_processor=None,
        feature_extractor=None,
        video_processor=None,
        token_layout: dict | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        audio_token: str = "<audio>",
        video_token: str = "<video>",
        system_prompt: str | None = None,
        audio_at_feature_rate: bool = False,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("MultimodalProcessor needs a tokenizer")
        if token_layout is None:
            raise ValueError(
                "MultimodalProcessor needs token_layout (MediaTokenLayout.to_dict()); "
                "use MultimodalProcessor.from_config_and_components(config, tokenizer)"
            )
        self.token_layout = MediaTokenLayout.from_dict(dict(token_layout)).to_dict()
        self.image_token, self.audio_token, self.video_token = image_token, audio_token, video_token
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        self.system_prompt = system_prompt
        self.audio_at_feature_rate = bool(audio_at_feature_rate)
        given = {"image_processor": image_processor, "feature_extractor": feature_extractor, "video_processor": video_processor}
        # Only the components of the modalities the layout has: a model without an audio tower carries no feature
        # extractor (vLLM and pipelines read a present one as "this model takes audio"); `get_attributes()` on the
        # instance lists what it has, so saving and loading follow.
        self._components = ["tokenizer"] + [name for name, kind in COMPONENT_MODALITY.items() if kind in self.supported_modalities]
        components = {name: given[name] if given[name] is not None else COMPONENT_DEFAULTS[name]() for name in self._components[1:]}
        super().__init__(
            tokenizer=tokenizer,
            **components,
            chat_template=chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE,
            **kwargs,
        )
        self.media_token_ids = {}
        for kind in self.supported_modalities:
            token = self.placeholder(kind)
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no {token!r} token, but the model takes {kind}s; add it with "
                    f"tokenizer.add_special_tokens(...) and resize the model's embeddings"
                )
            self.media_token_ids[kind] = token_id
            setattr(self, f"{kind}_token_id", token_id)  # what `ProcessorMixin.create_mm_token_type_ids` reads
        if not self._takes_structured_content(self.chat_template):  # an LM's own string-content template
            placeholders = {kind: self.placeholder(kind) for kind in MODALITIES}
            self.chat_template = with_media_parts_as_placeholders(self.chat_template, placeholders)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `ProcessorMixin.save_pretrained`, writing the flattened code and `auto_map` as the model does
        (`MultimodalPreTrainedModel.save_pretrained`)."""
        # By name, not `from ..hub import`: the packager reads the installed package's sources and is not part of
        # the flattened code it writes; loaded as remote code, there is no package to import it from.
        try:
            hub = importlib.import_module("modeling_multimodal.hub.custom_code")
        except ImportError:  # loaded as remote code: the files are already flat, transformers copies them
            return super().save_pretrained(save_directory, *args, **kwargs)
        with hub.code_saved_flat(self, save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)

    def check_argument_for_proper_class(self, argument_name, argument):
        """transformers 5.24 looks the video base class up through a torchvision-gated mapping; check it directly."""
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor must be a VideoProcessorMixin, got {type(argument).__name__}")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)

    # --- construction from a model config ---------------------------------------------------------
    @classmethod
    def from_config_and_components(
        cls, config, tokenizer, image_processor=None, feature_extractor=None, video_processor=None, chat_template=None,
        system_prompt=None,
    ) -> "MultimodalProcessor":
        """A processor that agrees with `config` (a `MultimodalConfig`): its token layout, image size, mel bins, frames.

        Missing components are built to match the towers (crop = `vision_config.image_size`, the tower family's
        mean/std, `feature_size = audio_config.num_mel_bins`). Given components are checked against the config,
        and the tokenizer's placeholder ids against `config.image_token_id` / `audio_token_id` / `video_token_id`.
        """
        layout = MediaTokenLayout.from_config(config)
        problems = []
        for kind in MODALITIES:
            expected = getattr(config, f"{kind}_token_id")
            if expected is not None and tokenizer.convert_tokens_to_ids(f"<{kind}>") != expected:
                found = tokenizer.convert_tokens_to_ids(f"<{kind}>")
                problems.append(f"the tokenizer maps '<{kind}>' to {found} but config.{kind}_token_id={expected}")
        if config.vision_config is not None:
            side = config.vision_config.image_size
            image_options = {
                "size": {"shortest_edge": side},
                "crop_size": {"height": side, "width": side},
                **VISION_NORMALIZATION.get(config.vision_config.model_type, _CLIP),
            }
            image_processor = image_processor or MultimodalImageProcessor(**image_options)
            video_processor = video_processor or MultimodalVideoProcessor(
                num_frames=config.video_num_frames, **image_options
            )
            for name, component in (("image_processor", image_processor), ("video_processor", video_processor)):
                crop = component.crop_size if component.do_center_crop else component.size
                if (crop.height, crop.width) != (side, side):
                    problems.append(f"{name} outputs {crop.height}x{crop.width} but vision_config.image_size={side}")
        if config.audio_config is not None:
            mel_bins = config.audio_config.num_mel_bins
            feature_extractor = feature_extractor or WhisperFeatureExtractor(feature_size=mel_bins)
            if feature_extractor.feature_size != mel_bins:
                problems.append(
                    f"feature_extractor.feature_size={feature_extractor.feature_size} but audio_config.num_mel_bins={mel_bins}"
                )
        if problems:
            raise ValueError("the components do not match the config:\n  - " + "\n  - ".join(problems))
        return cls(
            tokenizer,
            image_processor,
            feature_extractor,
            video_processor,
            token_layout=layout.to_dict(),
            chat_template=chat_template,
            system_prompt=system_prompt,
        )

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        """As `ProcessorMixin`'s, but a component of a modality the saved layout lacks is absent (`None`), not looked
        up: an image-only model is saved without a feature extractor."""
        present = layout_modalities(MediaTokenLayout.from_dict(processor_dict.get("token_layout") or {}))
        absent = [name for name, kind in COMPONENT_MODALITY.items() if kind not in present and name not in processor_dict]
        processor_dict = {**processor_dict, **dict.fromkeys(absent, False)}  # not a dict: the base class skips them
        processor_dict, kwargs = super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)
        return {**processor_dict, **dict.fromkeys(absent, None)}, kwargs

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Rebuild the components from `processor_config.json` (no Auto* lookup, so no torchvision is needed).

        Options in `kwargs` reach every component that has them, as transformers' processors do:
        `MultimodalProcessor.from_pretrained(path, do_normalize=False)` sets the image and the video processor's.
        """
        processor_dict = processor_dict or {}
        subfolder = kwargs.pop("subfolder", "")
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        layout = MediaTokenLayout.from_dict(processor_dict.get("token_layout") or {})
        components = []
        for name, component_class in COMPONENT_DEFAULTS.items():
            values = processor_dict.get(name)
            if not isinstance(values, dict):
                if COMPONENT_MODALITY[name] in layout_modalities(layout):
                    raise ValueError(f"{pretrained_model_name_or_path}: processor_config.json has no {name!r} entry")
                components.append(None)  # the model takes no such media (saved without the component)
                continue
            values = {k: v for k, v in values.items() if not k.endswith("_type")}
            options = {
                key: value for key, value in kwargs.items()
                if not key.startswith("_") and (key in values or hasattr(component_class, key))
            }
            components.append(component_class.from_dict({**values, **options}))
        return [tokenizer, *components]

    # --- small helpers ----------------------------------------------------------------------------
    @property
    def layout(self) -> MediaTokenLayout:
        return MediaTokenLayout.from_dict(self.token_layout)

    @property
    def supported_modalities(self) -> list[str]:
        return layout_modalities(self.layout)

    def placeholder(self, kind: str) -> str:
        return {"image": self.image_token, "audio": self.audio_token, "video": self.video_token}[kind]

    @property
    def model_input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "pixel_values", "image_tiles", "input_features", "input_features_mask"]
        return names + ["pixel_values_videos", "video_frames", "video_audio_features", "video_audio_features_mask"]

    # --- placeholder expansion (STYLE: replace_<modality>_token) -------------------------------------
    def replace_image_token(self, image_inputs=None, image_idx: int = 0, **kwargs) -> str:
        """The image's tokens; tiled, as many as its tile grid (`image_inputs["image_tiles"][image_idx]`) gives."""
        tiles = (image_inputs or {}).get("image_tiles")
        return self.image_token * self.layout.image_tokens(None if tiles is None else tuple(tiles[image_idx].tolist()))

    def replace_video_token(self, video_inputs=None, video_idx: int = 0, **kwargs) -> str:
        """The video's frame tokens, and with its sound track the track's tokens too (all as `<video>`); with
        `video_timestamps`, each time step's time as text ("<t=1.5s>") before its tokens."""
        video_inputs = video_inputs or {}
        track_frames = self._track_mel_frames(video_inputs)
        frames = video_inputs.get("video_frames")
        times = None
        if self.layout.video_timestamps:
            try:
                times = list(video_inputs["video_metadata"][video_idx].timestamps)
            except (KeyError, TypeError, IndexError, ValueError, AttributeError, ZeroDivisionError) as err:
                raise ValueError(
                    f"video {video_idx}: video_timestamps needs each sampled frame's time, but it is unknown ({err!r}); "
                    'give a frame array as {"frames": ..., "fps": ...}'
                ) from err
        return self.video_replacement(
            track_frames[video_idx] if track_frames else 0, None if frames is None else int(frames[video_idx]), times
        )

    def video_replacement(self, track_mel_frames: int = 0, num_frames: int | None = None, frame_times=None) -> str:
        """What one video's `<video>` placeholder becomes: `layout.video_tokens(track_mel_frames, num_frames)`
        placeholders, and with `video_timestamps` the time of each step's first frame (`frame_times`: every sampled
        frame's, in seconds) as text before that step's tokens. Shared with `ExampleEncoder.estimate_length`."""
        steps = self.layout.video_token_steps(track_mel_frames, num_frames)
        if not self.layout.video_timestamps:
            return self.video_token * sum(count + audio for count, audio in steps)
        stride = self.layout.video_temporal_pool_stride
        return "".join(
            f"{timestamp_text(frame_times[step * stride])}{self.video_token * (count + audio)}"
            for step, (count, audio) in enumerate(steps)
        )

    @staticmethod
    def _track_mel_frames(data: dict) -> list[int]:
        """Mel frames of each video's sound track (0 for a video without one); [] when no video has a track."""
        mask = data.get("video_audio_features_mask")
        return [] if mask is None else mask.sum(-1).tolist()

    def replace_audio_token(self, audio_inputs, audio_idx: int, **kwargs) -> str:
        num_mel_frames = int(audio_inputs["input_features_mask"][audio_idx].sum())
        return self.audio_token * self.layout.audio_tokens(num_mel_frames)

    # --- the call: ProcessorMixin's steps, with truncation between tokenizing and padding ----------
    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        audio=None,
        videos=None,
        **kwargs: Unpack[MultimodalProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Tokenize `text`, expanding each placeholder to its item's token count, and turn the media into tensors.

        The steps and hooks of `ProcessorMixin.__call__` (`prepare_inputs_layout`, `_merge_kwargs`, `_process_images` /
        `_process_audio` / `_process_videos` with `replace_<modality>_token`, `get_text_with_replacements`,
        `_check_special_mm_tokens`), run here rather than through `super().__call__` for one reason: the base class
        tokenizes, truncates and pads in one tokenizer call, and truncation must never cut a media span
        (`truncation.py`), so the ids are truncated between tokenizing and padding.

        Args:
            text: one string or a list (one per sample), with `<image>`, `<audio>`, `<video>` placeholders.
            images / audio (or `audios`) / videos: per sample (a list with one list per text) or flat in placeholder
                order (`media_batch.py`). Images: paths, bytes, PIL images, numpy arrays, torch tensors. Audio: arrays
                or tensors (with `sampling_rate`), `{"array", "sampling_rate"}` dicts, paths or bytes (wav, flac, ogg,
                mp3, or anything ffmpeg decodes). Videos: paths or bytes (mp4, webm, mkv, avi, ...), 4-D frame arrays,
                or `{"frames", "fps"}` dicts.
            **kwargs: `MultimodalProcessorKwargs`, flat or grouped; defaults come from `MultimodalProcessor.text_kwargs`,
                then the tokenizer's own init kwargs. The ones this processor reads itself:
                text: `return_tensors` ("pt" default, or "np"), `padding` (True) / `padding_side` / `pad_to_multiple_of`;
                    `truncation` / `max_length` cut text, but a cut that would remove any media token raises a
                    `ValueError` (see `apply_chat_template(drop_trailing_turns=True)`); `add_special_tokens`;
                    `return_offsets_mapping` (per sample, unpadded, a non-tensor entry).
                audio: `sampling_rate` of raw arrays (resampled to the feature extractor's rate); raw arrays without it
                    are refused unless `audio_at_feature_rate=True` (here or on the processor) says they are already at
                    the feature extractor's rate (vLLM's call); `truncate_audio` keeps the first
                    `layout.max_audio_mel_frames()` frames of longer clips (with a warning) instead of raising.
                videos: `fps` (sample at this rate, then fit to the layout's `video_num_frames`; default uniform),
                    `video_metadata` (one per frame array: its `fps`, as vLLM passes it), `return_metadata` (adds
                    `video_metadata`, a non-tensor entry), `use_audio_in_video` (True, or one bool per video: each
                    video file's sound track is read in the same pass as its frames), the video processor's options.
                images: the image processor's options (`do_rescale`, `size`, `max_image_pixels`, ...).
                `return_text_replacement_offsets`: where each placeholder was expanded (non-tensor);
                `return_mm_token_type_ids`: 0 text, 1 image, 2 video, 3 audio per token.
        """
        if audio is None and "audios" in kwargs:  # the name lmms-eval and older pipelines pass
            audio = kwargs.pop("audios")
        images, texts, videos, audio = self.prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio)
        options = self._merge_kwargs(
            MultimodalProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **self._known_only(kwargs)
        )
        text_options = options["text_kwargs"]
        return_tensors = text_options.get("return_tensors") or "pt"
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")

        # media -> tensors (every file and array is validated here, before any text is tokenized)
        data, replacements = {}, dict.fromkeys(MODALITIES, [])
        steps = (("image", images, self._process_images), ("audio", audio, self._process_audio), ("video", videos, self._process_videos))
        for kind, media, process in steps:
            if media is not None:
                processed, replacements[kind] = process(media, **options[KWARGS_GROUPS[kind]])
                data.update(processed)
        metadata = data.pop("video_metadata", None)

        # text: expand placeholders, tokenize, check counts, truncate (never inside media), pad
        expanded, offsets = self.get_text_with_replacements(texts, replacements["image"], replacements["video"], replacements["audio"])
        return_offsets_mapping = bool(text_options.get("return_offsets_mapping"))
        encoded = self.tokenizer(
            expanded, add_special_tokens=text_options.get("add_special_tokens", True), return_offsets_mapping=return_offsets_mapping
        )
        self._check_special_mm_tokens(expanded, encoded, list(self.media_token_ids))
        offset_mapping, padded = self._truncate_and_pad(encoded, text_options)
        if options.get("return_mm_token_type_ids"):
            padded["mm_token_type_ids"] = self.create_mm_token_type_ids(padded["input_ids"])
        output = BatchFeature({**padded, **data}, tensor_type="pt")
        for key in ("input_ids", "attention_mask"):  # integers even for empty texts (torch reads [[]] as float)
            output[key] = output[key].long()
        if return_tensors == "np":
            output = BatchFeature({k: v.numpy() for k, v in output.items()})
        # non-tensor entries, added after the tensor conversion
        if options["videos_kwargs"].get("return_metadata") and metadata is not None:
            output["video_metadata"] = metadata
        if return_offsets_mapping:
            output["offset_mapping"] = offset_mapping
        if options.get("return_text_replacement_offsets"):
            output["text_replacement_offsets"] = offsets
        return output

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """The texts as a list and each modality's media as one list per sample (None when no sample has any), checked
        against the placeholders (`media_batch.assign_media`). Nothing is fetched: the sub-processors decode paths."""
        if text is None:
            raise ValueError("MultimodalProcessor needs text (use '<image>' etc. as placeholders for the media)")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(sample, str) for sample in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        given = {"image": images, "audio": audio, "video": videos}
        per_sample = {
            kind: assign_media(kind, given[kind], texts, self.placeholder(kind), kind in self.supported_modalities)
            for kind in MODALITIES
        }
        images, audio, videos = (per_sample[kind] if any(per_sample[kind]) else None for kind in MODALITIES)
        return images, texts, videos, audio

    def _check_special_mm_tokens(self, text: list[str], text_inputs, modalities: list[str]) -> None:
        """Each sample must hold one media token per placeholder token of its expanded text (else the tokenizer
        split a placeholder)."""
        for sample, (expanded, ids) in enumerate(zip(text, text_inputs["input_ids"])):
            for kind in modalities:
                token = self.placeholder(kind)
                expected, found = expanded.count(token), list(ids).count(self.media_token_ids[kind])
                if found != expected:
                    raise ValueError(
                        f"sample {sample}: {found} {token} tokens after tokenization but its {kind}s need {expected}; "
                        f"the tokenizer must treat {token} as one special token"
                    )

    def _truncate_and_pad(self, encoded, text_options: dict) -> tuple[list | None, dict]:
        """(offset mapping, padded ids and attention mask): truncated outside media (`truncation.py`), then padded."""
        padding, max_length = text_options.get("padding", True), text_options.get("max_length")
        if text_options.get("truncation"):
            media_ids = set(self.media_token_ids.values())
            left = self.tokenizer.truncation_side == "left"
            encoded = truncate_outside_media(encoded, max_length or self.tokenizer.model_max_length, media_ids, left)
        offset_mapping = encoded.pop("offset_mapping", None)
        padded = self.tokenizer.pad(
            dict(encoded),
            padding=padding,
            max_length=max_length if padding == "max_length" else None,
            pad_to_multiple_of=text_options.get("pad_to_multiple_of"),
            padding_side=text_options.get("padding_side"),
            return_attention_mask=True,
        )
        return offset_mapping, dict(padded)

    def _known_only(self, kwargs: dict) -> dict:
        """`kwargs` without the ones no part of the processor takes, warned about and ignored as transformers'
        processors do (pipelines pass options meant for others)."""
        known = set(MultimodalProcessorKwargs.__annotations__) | {"common_kwargs"}
        for group in ("text_kwargs", *KWARGS_GROUPS.values()):
            known |= set(MultimodalProcessorKwargs.__annotations__[group].__annotations__)
        for component in (getattr(self, "image_processor", None), getattr(self, "video_processor", None)):
            known |= set(getattr(getattr(component, "valid_kwargs", None), "__annotations__", {}))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            logger.warning(
                f"Keyword arguments {unknown} are not options of the tokenizer, the image, audio or video processor, "
                "nor of MultimodalProcessorKwargs, and are ignored."
            )
        return {key: value for key, value in kwargs.items() if key not in unknown}

    # --- media -> tensors (ProcessorMixin's `_process_<modality>` hooks: (tensors, replacement per item)) -----
    def _media_error(self, kind: str, per_sample: list[list], err: MediaInputError) -> ValueError:
        sample, position, item = locate(per_sample, err.index)
        return ValueError(f"sample {sample}, {kind} {position} ({describe(item)}): {err.detail}")

    def _process_images(self, images: list[list], **kwargs) -> tuple[dict, list[str]]:
        flat = [item for items in images for item in items]
        max_tiles = self.layout.image_max_tiles
        if kwargs.get("max_tiles", max_tiles) not in (None, max_tiles):
            raise ValueError(f"max_tiles={kwargs['max_tiles']} but the model tiles images into at most image_max_tiles={max_tiles}")
        options = {key: value for key, value in kwargs.items() if key != "return_tensors"}
        try:
            out = self.image_processor(flat, **{**options, "max_tiles": max_tiles})
            processed = {key: out[key] for key in ("pixel_values", "image_tiles") if key in out}
        except MediaInputError as err:
            raise self._media_error("image", images, err) from err
        return processed, [self.replace_image_token(processed, index) for index in range(len(flat))]

    def _process_audio(self, audio: list[list], **kwargs) -> tuple[dict, list[str]]:
        """Each clip's log-mel alone, right-padded with zeros to the longest; the mask marks real frames."""
        extractor, max_frames = self.feature_extractor, self.layout.max_audio_mel_frames()
        truncate_audio, sampling_rate = bool(kwargs.get("truncate_audio")), kwargs.get("sampling_rate")
        at_feature_rate = kwargs.get("audio_at_feature_rate")
        if sampling_rate is None and (self.audio_at_feature_rate if at_feature_rate is None else at_feature_rate):
            sampling_rate = extractor.sampling_rate
        mels = []
        for sample, items in enumerate(audio):
            for position, item in enumerate(items):
                where = f"sample {sample}, audio {position} ({describe(item)})"
                try:
                    # a file that reaches max_frames + 1 frames is refused from its header, before decoding; with
                    # truncate_audio only the max_frames it keeps are decoded
                    longest = (max_frames + (0 if truncate_audio else 1)) * extractor.hop_length / extractor.sampling_rate
                    samples = load_audio(item, sampling_rate, extractor.sampling_rate, longest, truncate_audio)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from err
                frames = self._mel_frames(len(samples))
                if frames > max_frames:
                    seconds, limit = len(samples) / extractor.sampling_rate, max_frames * extractor.hop_length
                    message = (
                        f"{where} lasts {seconds:.2f} s ({frames} mel frames), more than the audio encoder's "
                        f"{max_frames} frames ({limit / extractor.sampling_rate:.2f} s)"
                    )
                    if not truncate_audio:
                        raise ValueError(message + "; split it, or pass truncate_audio=True to keep its beginning")
                    logger.warning(message + "; truncated (truncate_audio=True)")
                    samples = samples[:limit]
                mels.append(log_mel(extractor, samples))  # (n_mels, frames)
        features, mask = pad_log_mels(mels)
        processed = {"input_features": features, "input_features_mask": mask}
        return processed, [self.replace_audio_token(processed, index) for index in range(len(mels))]

    def _process_videos(self, videos: list[list], **kwargs) -> tuple[dict, list[str]]:
        """Frames (and, with `use_audio_in_video`, each file's sound track, read in the same decoding pass)."""
        layout = self.layout
        num_frames = layout.video_num_frames
        if kwargs.get("num_frames", num_frames) != num_frames:
            raise ValueError(f"num_frames={kwargs['num_frames']} but the model takes exactly {num_frames} frames per video")
        if layout.video_fps is not None:  # the model's rate decides each video's frame count, so its tokens
            if kwargs.get("fps") not in (None, layout.video_fps):
                raise ValueError(f"fps={kwargs['fps']} but the model samples videos at video_fps={layout.video_fps}")
            kwargs = {**kwargs, "fps": layout.video_fps, "frame_multiple": layout.video_temporal_pool_stride}
        skip = ("return_tensors", "return_metadata", "use_audio_in_video", "video_metadata", "do_sample_frames")
        options = {key: value for key, value in kwargs.items() if key not in skip and value is not None}
        flat = [item for items in videos for item in items]
        wanted = flags_per_video(kwargs.get("use_audio_in_video") or False, len(flat))  # checked before decoding
        if kwargs.get("video_metadata") is not None:
            flat = with_frame_rates(flat, kwargs["video_metadata"])
        try:
            out = self.video_processor(
                flat, **options, num_frames=num_frames, return_metadata=True, sound_tracks=self._track_requests(videos, wanted)
            )
        except MediaInputError as err:
            raise self._media_error("video", videos, err) from err
        processed = {"pixel_values_videos": out["pixel_values_videos"], "video_metadata": out["video_metadata"]}
        if "video_frames" in out:
            processed["video_frames"] = out["video_frames"]
        if any(wanted):
            mels = [self._track_mel(videos, index, track) for index, track in enumerate(out["video_sound_tracks"])]
            processed["video_audio_features"], processed["video_audio_features_mask"] = pad_log_mels(mels)
        return processed, [self.replace_video_token(processed, index) for index in range(len(flat))]

    def _track_requests(self, videos: list[list], wanted: list[bool]) -> list[SoundTrackRequest | None] | None:
        """What `use_audio_in_video` asks of each video's decoding pass: its sound track at the feature extractor's
        rate, fitted to the frames' span, which must fit the audio encoder (30 s for Whisper)."""
        if not any(wanted):
            return None
        extractor, max_frames = self.feature_extractor, self.layout.max_audio_mel_frames()
        request = SoundTrackRequest(
            sampling_rate=extractor.sampling_rate,
            max_samples=(max_frames + 1) * extractor.hop_length - 1,  # the longest clip of at most max_frames frames
            encoder_seconds=max_frames * extractor.hop_length / extractor.sampling_rate,
        )
        for index, with_track in enumerate(wanted):
            sample, position, item = locate(videos, index)
            if with_track and not isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
                raise ValueError(
                    f"sample {sample}, video {position} ({describe(item)}): use_audio_in_video reads the sound track "
                    "of a video file (a path or bytes); frame arrays have none"
                )
        return [request if with_track else None for with_track in wanted]

    def _track_mel(self, videos: list[list], index: int, track) -> torch.Tensor | None:
        """The log-mel of a video's sound track (None without one), warning when the track's own length differs
        from its frames' by more than one time window (whole windows then hold silence, or sound past the last
        frame is dropped)."""
        if track is None:
            return None
        samples, track_seconds = track
        seconds = len(samples) / self.feature_extractor.sampling_rate  # the frames' span: the track is fitted to it
        steps = self.layout.video_num_frames // self.layout.video_temporal_pool_stride
        if abs(track_seconds - seconds) > seconds / steps:
            sample, position, item = locate(videos, index)
            how = "cut to" if track_seconds > seconds else "padded with silence to"
            logger.warning(
                f"sample {sample}, video {position} ({describe(item)}): its sound track lasts {track_seconds:.2f} "
                f"s{'+' if track_seconds > seconds else ''}, its frames {seconds:.2f} s; the track is {how} the frames' span"
            )
        return log_mel(self.feature_extractor, samples)

    def _mel_frames(self, num_samples: int) -> int:
        """Log-mel frames of a clip of `num_samples` samples at the feature extractor's rate."""
        return mel_frame_count(num_samples, self.feature_extractor.hop_length, self.feature_extractor.n_fft)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, audio_lengths=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per item, from the layout the model checks against (what vLLM and pipelines ask).

        image_sizes: (height, width) per image (untiled, every image is resized to the tower's crop and only their
        number matters; tiled, each size decides its tile grid and so its tokens and crops, `num_image_patches`);
        video_sizes: (frames, height, width) per video: only their number matters, except with `video_fps`, where the
        frames are those the rate gives (each video keeps `layout.video_frame_count(frames)`); `video_timestamps` text
        is not a placeholder and is not counted;
        audio_lengths: samples per clip at the feature extractor's rate (clips longer than the encoder takes count
        as truncated). A modality the model lacks gets no count (vLLM probes every modality and reads that as "none").
        """
        layout, data, present = self.layout, {}, self.supported_modalities
        if image_sizes is not None and "image" in present:
            grids = [layout.image_tile_grid(*size) if layout.image_max_tiles else None for size in image_sizes]
            data.update(
                num_image_tokens=[layout.image_tokens(grid) for grid in grids],
                num_image_patches=[layout.image_crops(grid) for grid in grids],
            )
        if video_sizes is not None and "video" in present:
            data["num_video_tokens"] = [layout.video_tokens(0, layout.video_frame_count(int(size[0]))) for size in video_sizes]
        if audio_lengths is not None and "audio" in present:
            frames = [min(self._mel_frames(n), layout.max_audio_mel_frames()) for n in audio_lengths]
            data["num_audio_tokens"] = [layout.audio_tokens(count) for count in frames]
        return MultiModalData(**data)


__all__ = ["MultimodalProcessor", "DEFAULT_CHAT_TEMPLATE", "ASSISTANT_PREFIX"]
