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
    pixel_values                       (n_images, 3, H, W)           all images, sample 0's first
    input_features                     (n_audios, n_mels, T_max)     zero-padded log-mels
    input_features_mask                (n_audios, T_max)             1 = real mel frame
    pixel_values_videos                (n_videos, num_frames, 3, H, W)
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
from .audio_loading import load_audio, load_video_track, log_mel, mel_frame_count, pad_log_mels
from .chat_template import ASSISTANT_PREFIX, DEFAULT_CHAT_TEMPLATE, ChatTemplateMixin
from .image_processing_multimodal import MediaInputError, MultimodalImageProcessor, describe
from .truncation import truncate_outside_media
from .video_processing_multimodal import MultimodalVideoProcessor, MultimodalVideosKwargs

logger = logging.get_logger(__name__)

# Image normalisation of the vision towers `MultimodalConfig` supports (what their own processors use).
_CLIP = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
_HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
VISION_NORMALIZATION = {"clip_vision_model": _CLIP, "siglip_vision_model": _HALF, "vit": _HALF, "dinov2": _IMAGENET}


class MultimodalAudioKwargs(AudioKwargs, total=False):
    """`AudioKwargs` plus `truncate_audio` (keep the first frames the encoder takes instead of raising)."""

    sampling_rate: int | float | None  # checked (and a fractional rate refused, naming it) by `load_audio`
    truncate_audio: bool | None


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


def _is_per_sample(media) -> bool:
    """A list whose every entry is a list (or None) gives media per sample; anything else is flat."""
    if not isinstance(media, (list, tuple)) or len(media) == 0:
        return False
    return all(m is None or isinstance(m, (list, tuple)) for m in media)


def _flatten(media, kind: str) -> list:
    """Flat media as a list; a 4-D image array/tensor is a batch of images (a 4-D video array is one video)."""
    if kind == "image" and isinstance(media, (np.ndarray, torch.Tensor)) and media.ndim == 4:
        return list(media)
    return list(media) if isinstance(media, (list, tuple)) else [media]


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
        names = ["input_ids", "attention_mask", "pixel_values", "input_features", "input_features_mask"]
        return names + ["pixel_values_videos", "video_audio_features", "video_audio_features_mask"]

    # --- placeholder expansion (STYLE: replace_<modality>_token) -------------------------------------
    def replace_image_token(self, image_inputs=None, image_idx: int = 0, **kwargs) -> str:
        return self.image_token * self.layout.image_tokens()

    def replace_video_token(self, video_inputs=None, video_idx: int = 0, **kwargs) -> str:
        """The video's frame tokens, and with its sound track the track's tokens too (all as `<video>`)."""
        track_frames = self._track_mel_frames(video_inputs or {})
        return self.video_token * self.layout.video_tokens(track_frames[video_idx] if track_frames else 0)

    @staticmethod
    def _track_mel_frames(data: dict) -> list[int]:
        """Mel frames of each video's sound track (0 for a video without one); [] when no video has a track."""
        mask = data.get("video_audio_features_mask")
        return [] if mask is None else mask.sum(-1).tolist()

    def replace_audio_token(self, audio_inputs, audio_idx: int, **kwargs) -> str:
        num_mel_frames = int(audio_inputs["input_features_mask"][audio_idx].sum())
        return self.audio_token * self.layout.audio_tokens(num_mel_frames)

    # --- the call ---------------------------------------------------------------------------------
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

        Args:
            text: one string or a list (one per sample), with `<image>`, `<audio>`, `<video>` placeholders.
            images / audio / videos: per sample (a list with one list per text) or flat in placeholder order
                (sample 0's first). Images: paths, bytes, PIL images, numpy arrays, torch tensors. Audio: arrays or
                tensors (with `sampling_rate`), `{"array", "sampling_rate"}` dicts, paths or bytes (wav, flac, ogg, mp3,
                or anything ffmpeg decodes). Videos: paths or bytes (mp4, webm, mkv, avi, ...), 4-D frame arrays, or
                `{"frames", "fps"}` dicts. A Python list is never a single item.
            **kwargs: `MultimodalProcessorKwargs`, flat or grouped as transformers' processors take them; defaults
                come from `MultimodalProcessor.text_kwargs`, then the tokenizer's own init kwargs. The ones this
                processor reads itself:
                text: `return_tensors` ("pt" default, or "np"), `padding` (True) / `padding_side` / `pad_to_multiple_of`
                    as the tokenizer's (`padding_side="left"` for generation); `truncation` / `max_length` cut text,
                    but a cut that would remove any media token raises a `ValueError` (see
                    `apply_chat_template(drop_trailing_turns=True)`); `add_special_tokens` (the tokenizer's BOS/EOS);
                    `return_offsets_mapping` (per sample, unpadded, a non-tensor entry).
                audio: `sampling_rate` of raw arrays (resampled to the feature extractor's rate); `truncate_audio`
                    keeps the first `layout.max_audio_mel_frames()` frames of longer clips (with a warning) instead
                    of raising.
                videos: `fps` (sample at this rate, then fit to the layout's `video_num_frames`; default uniform),
                    `return_metadata` (adds `video_metadata`, a non-tensor entry), `use_audio_in_video` (True, or one
                    bool per video: read each video file's sound track too, see `_video_tracks`), and the video
                    processor's options.
                images: the image processor's options (`do_rescale`, `size`, `max_image_pixels`, ...).
                `return_text_replacement_offsets`: where each placeholder was expanded in the text (non-tensor).
        """
        unknown = sorted(set(kwargs) - self._known_kwargs())
        if unknown:  # as transformers' processors: warned and ignored (pipelines pass options meant for others)
            logger.warning(
                f"Keyword arguments {unknown} are not options of the tokenizer, the image, audio or video processor, "
                "nor of MultimodalProcessorKwargs, and are ignored."
            )
            kwargs = {key: value for key, value in kwargs.items() if key not in unknown}
        options = self._merge_kwargs(MultimodalProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_options, audio_options = options["text_kwargs"], options["audio_kwargs"]
        images_kwargs = {k: v for k, v in options["images_kwargs"].items() if k != "return_tensors"}
        skip = ("return_tensors", "fps", "return_metadata", "use_audio_in_video")
        videos_kwargs = {k: v for k, v in options["videos_kwargs"].items() if k not in skip}
        fps, return_metadata = options["videos_kwargs"].get("fps"), options["videos_kwargs"].get("return_metadata", False)
        use_audio_in_video = options["videos_kwargs"].get("use_audio_in_video") or False
        sampling_rate, truncate_audio = audio_options.get("sampling_rate"), audio_options.get("truncate_audio", False)
        return_tensors = text_options.get("return_tensors") or "pt"
        padding, padding_side = text_options.get("padding", True), text_options.get("padding_side")
        truncation, max_length = text_options.get("truncation") or False, text_options.get("max_length")
        pad_to_multiple_of = text_options.get("pad_to_multiple_of")
        add_special_tokens = text_options.get("add_special_tokens", True)
        return_offsets_mapping = bool(text_options.get("return_offsets_mapping"))
        return_text_replacement_offsets = bool(options.get("return_text_replacement_offsets"))
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if text is None:
            raise ValueError("MultimodalProcessor needs text (use '<image>' etc. as placeholders for the media)")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(sample, str) for sample in texts):
            raise ValueError("text must be a string or a non-empty list of strings")

        # 1. cheap checks first: modalities, placeholder counts, batch lengths
        given = {"image": images, "audio": audio, "video": videos}
        per_sample = {kind: self._assign_media(kind, given[kind], texts) for kind in MODALITIES}

        # 2. media -> tensors (every file and array is validated here, before any text is tokenized)
        data, replacements = {}, {kind: [] for kind in MODALITIES}
        if any(per_sample["image"]):
            data.update(self._images_to_tensors(per_sample["image"], images_kwargs or {}))
            replacements["image"] = [self.replace_image_token(data, i) for i in range(len(data["pixel_values"]))]
        if any(per_sample["audio"]):
            data.update(self._audio_to_tensors(per_sample["audio"], sampling_rate, truncate_audio))
            replacements["audio"] = [self.replace_audio_token(data, i) for i in range(len(data["input_features"]))]
        if any(per_sample["video"]):
            data.update(self._videos_to_tensors(per_sample["video"], fps, videos_kwargs or {}, use_audio_in_video))
            replacements["video"] = [self.replace_video_token(data, i) for i in range(len(data["pixel_values_videos"]))]
        metadata = data.pop("video_metadata", None)

        # 3. text: expand placeholders, tokenize, check counts, truncate (never inside media), pad
        expanded, offsets = self.get_text_with_replacements(
            list(texts), replacements["image"], replacements["video"], replacements["audio"]
        )
        encoded = self.tokenizer(
            expanded, add_special_tokens=add_special_tokens, return_offsets_mapping=return_offsets_mapping
        )
        self._check_token_counts(encoded["input_ids"], per_sample, data)
        if truncation:
            max_length = max_length or self.tokenizer.model_max_length
            media_ids = set(self.media_token_ids.values())
            encoded = truncate_outside_media(encoded, max_length, media_ids, self.tokenizer.truncation_side == "left")
        offset_mapping = encoded.pop("offset_mapping", None)
        padded = self.tokenizer.pad(
            dict(encoded),
            padding=padding,
            max_length=max_length if padding == "max_length" else None,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=True,
        )
        output = BatchFeature({**padded, **data}, tensor_type="pt", skip_tensor_conversion=["video_metadata"])
        for key in ("input_ids", "attention_mask"):  # integers even for empty texts (torch reads [[]] as float)
            output[key] = output[key].long()
        if return_tensors == "np":
            output = BatchFeature({k: v.numpy() for k, v in output.items()})
        # non-tensor entries, added after the tensor conversion
        if return_metadata and metadata is not None:
            output["video_metadata"] = metadata
        if return_offsets_mapping:
            output["offset_mapping"] = offset_mapping
        if return_text_replacement_offsets:
            output["text_replacement_offsets"] = offsets
        return output

    def _mel_frames(self, num_samples: int) -> int:
        """Log-mel frames of a clip of `num_samples` samples at the feature extractor's rate."""
        return mel_frame_count(num_samples, self.feature_extractor.hop_length, self.feature_extractor.n_fft)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, audio_lengths=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per item, from the layout the model checks against (what vLLM and pipelines ask).

        image_sizes: (height, width) per image; video_sizes: (frames, height, width) per video (every image and
        video is resized to the tower's crop and sampled to the layout's frame count, so only their number matters);
        audio_lengths: samples per clip at the feature extractor's rate (clips longer than the encoder takes count
        as truncated).
        """
        layout, data, present = self.layout, {}, self.supported_modalities
        # a modality the model lacks gets no count (vLLM probes every modality and reads a missing one as "none")
        if image_sizes is not None and "image" in present:
            data.update(num_image_tokens=[layout.image_tokens()] * len(image_sizes), num_image_patches=[1] * len(image_sizes))
        if video_sizes is not None and "video" in present:
            data["num_video_tokens"] = [layout.video_tokens()] * len(video_sizes)
        if audio_lengths is not None and "audio" in present:
            frames = [min(self._mel_frames(n), layout.max_audio_mel_frames()) for n in audio_lengths]
            data["num_audio_tokens"] = [layout.audio_tokens(count) for count in frames]
        return MultiModalData(**data)

    def _known_kwargs(self) -> set[str]:
        """Every flat or grouped argument `__call__` routes (the TypedDicts and the components' `valid_kwargs`)."""
        known = set(MultimodalProcessorKwargs.__annotations__) | {"common_kwargs"}
        for group in ("text_kwargs", "images_kwargs", "audio_kwargs", "videos_kwargs"):
            known |= set(MultimodalProcessorKwargs.__annotations__[group].__annotations__)
        for component in (getattr(self, "image_processor", None), getattr(self, "video_processor", None)):
            known |= set(getattr(getattr(component, "valid_kwargs", None), "__annotations__", {}))
        return known

    def _assign_media(self, kind: str, media, texts: list[str]) -> list[list]:
        """Media of one kind as one list per sample, checked against the placeholders of each text."""
        token = self.placeholder(kind)
        counts = [sample.count(token) for sample in texts]
        if kind not in self.supported_modalities and (media is not None or any(counts)):
            tower, items = {"image": ("vision tower", "images"), "audio": ("audio tower", "audio"), "video": ("vision tower", "videos")}[kind]
            raise ValueError(
                f"this model has no {tower}, so it takes no {items}, but "
                + (f"{kind} inputs were given" if media is not None else f"sample {counts.index(max(counts))} contains {token}")
            )
        if media is None:
            for index, count in enumerate(counts):
                if count:
                    raise ValueError(f"sample {index} has {count} {token} placeholder(s) but no {kind} was given")
            return [[] for _ in texts]
        if _is_per_sample(media):
            if len(media) != len(texts):
                raise ValueError(
                    f"mismatched batch lengths: {len(texts)} texts but {len(media)} lists of {kind}s; "
                    f"give one list per text (empty for none) or a flat list in placeholder order"
                )
            grouped = [list(items) if items is not None else [] for items in media]
            for index, (items, count) in enumerate(zip(grouped, counts)):
                if len(items) != count:
                    raise ValueError(
                        f"sample {index} has {count} {token} placeholder(s) but {len(items)} {kind}(s) were given for it"
                    )
            return grouped
        flat = _flatten(media, kind)
        if len(flat) != sum(counts):
            raise ValueError(
                f"the text has {sum(counts)} {token} placeholder(s) (per sample: {counts}) but {len(flat)} {kind}(s) "
                "were given; each placeholder takes exactly one item, in order"
            )
        bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
        return [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def _locate(per_sample: list[list], flat_index: int) -> tuple[int, int, object]:
        """(sample, position in sample, item) of the flat_index-th item."""
        for sample, items in enumerate(per_sample):
            if flat_index < len(items):
                return sample, flat_index, items[flat_index]
            flat_index -= len(items)
        raise IndexError(flat_index)

    def _media_error(self, kind: str, per_sample: list[list], err: MediaInputError) -> ValueError:
        sample, position, item = self._locate(per_sample, err.index)
        return ValueError(f"sample {sample}, {kind} {position} ({describe(item)}): {err.detail}")

    def _images_to_tensors(self, per_sample: list[list], images_kwargs: dict) -> dict:
        flat = [item for items in per_sample for item in items]
        try:
            return {"pixel_values": self.image_processor(flat, **images_kwargs)["pixel_values"]}
        except MediaInputError as err:
            raise self._media_error("image", per_sample, err) from err

    def _videos_to_tensors(self, per_sample: list[list], fps: float | None, videos_kwargs: dict, use_audio_in_video=False) -> dict:
        num_frames = self.layout.video_num_frames
        if videos_kwargs.get("num_frames", num_frames) != num_frames:
            raise ValueError(
                f"num_frames={videos_kwargs['num_frames']} but the model takes exactly {num_frames} frames per video"
            )
        options = {**videos_kwargs, "num_frames": num_frames, "return_metadata": True}
        if fps is not None:
            options["fps"] = fps
        flat = [item for items in per_sample for item in items]
        wanted = self._videos_with_track(use_audio_in_video, len(flat))  # checked before anything is decoded
        try:
            out = self.video_processor(flat, **options)
        except MediaInputError as err:
            raise self._media_error("video", per_sample, err) from err
        data = {"pixel_values_videos": out["pixel_values_videos"], "video_metadata": out["video_metadata"]}
        if any(wanted):
            features, mask = self._video_tracks(per_sample, out["video_metadata"], wanted)
            data.update(video_audio_features=features, video_audio_features_mask=mask)
        return data

    @staticmethod
    def _videos_with_track(use_audio_in_video, num_videos: int) -> list[bool]:
        """`use_audio_in_video` (a bool, or one bool per video, flat or per sample) as one bool per video."""
        if isinstance(use_audio_in_video, (list, tuple)):
            flags = [flag for item in use_audio_in_video for flag in (item if isinstance(item, (list, tuple)) else [item])]
            if len(flags) != num_videos or not all(isinstance(flag, bool) for flag in flags):
                raise ValueError(
                    f"use_audio_in_video must be a bool or one bool per video ({num_videos} in placeholder order), "
                    f"got {use_audio_in_video!r}"
                )
            return flags
        if not isinstance(use_audio_in_video, bool):
            raise ValueError(f"use_audio_in_video must be a bool or a list of bools, got {use_audio_in_video!r}")
        return [use_audio_in_video] * num_videos

    def _video_tracks(self, per_sample: list[list], metadata: list, wanted: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-mel of each wanted video's sound track, fitted to the span of its frames; padded as `pad_log_mels`.

        The frames span `metadata.duration` seconds; the track is cut or padded with silence to exactly that, so
        the layout's equal time windows (`MediaTokenLayout.video_token_steps`) are the frames' own. A track whose
        length differs from the frames' by more than one window is still used, with a warning (whole windows then
        hold silence, or sound past the last frame is dropped). The span must fit the audio encoder (30 s for
        Whisper). Videos without a track get a row of length 0 (mask all 0).
        """
        extractor, layout = self.feature_extractor, self.layout
        steps = layout.video_num_frames // layout.video_temporal_pool_stride
        mels = []
        for index, (video_metadata, with_track) in enumerate(zip(metadata, wanted)):
            if not with_track:
                mels.append(None)
                continue
            sample, position, item = self._locate(per_sample, index)
            where = f"sample {sample}, video {position} ({describe(item)})"
            if not isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
                raise ValueError(
                    f"{where}: use_audio_in_video reads the sound track of a video file (a path or bytes); "
                    "frame arrays have none"
                )
            seconds = video_metadata.duration
            if not seconds or seconds <= 0:
                raise ValueError(f"{where}: cannot tell how long its frames last, so its sound track cannot be aligned")
            limit = layout.max_audio_mel_frames() * extractor.hop_length / extractor.sampling_rate
            if self._mel_frames(round(seconds * extractor.sampling_rate)) > layout.max_audio_mel_frames():
                raise ValueError(
                    f"{where} lasts {seconds:.2f} s; with use_audio_in_video its sound track must fit the audio "
                    f"encoder's {limit:.2f} s. Cut the video, or pass use_audio_in_video=False for it"
                )
            name = f"file {os.fspath(item)!r}" if isinstance(item, (str, os.PathLike)) else f"video bytes ({len(item)} bytes)"
            source = os.fspath(item) if isinstance(item, (str, os.PathLike)) else bytes(item)
            try:
                samples, track_seconds = load_video_track(source, name, extractor.sampling_rate, seconds)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
            if abs(track_seconds - seconds) > seconds / steps:
                how = "cut to" if track_seconds > seconds else "padded with silence to"
                logger.warning(
                    f"{where}: its sound track lasts {track_seconds:.2f} s{'+' if track_seconds > seconds else ''}, its "
                    f"frames {seconds:.2f} s; the track is {how} the frames' span"
                )
            mels.append(log_mel(extractor, samples))
        return pad_log_mels(mels)

    def _audio_to_tensors(self, per_sample: list[list], sampling_rate: int | None, truncate_audio: bool) -> dict:
        """Each clip's log-mel alone, right-padded with zeros to the longest; the mask marks real frames."""
        extractor = self.feature_extractor
        max_frames = self.layout.max_audio_mel_frames()
        mels = []
        for sample, items in enumerate(per_sample):
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
        return {"input_features": features, "input_features_mask": mask}

    def _check_token_counts(self, input_ids: list[list[int]], per_sample: dict, data: dict) -> None:
        """Each sample must hold exactly the media tokens its items produce (else the tokenizer split a placeholder)."""
        layout = self.layout
        audio_frames = data["input_features_mask"].sum(-1).tolist() if "input_features_mask" in data else []
        track_frames = self._track_mel_frames(data)
        num_images, num_videos = (sum(len(items) for items in per_sample[kind]) for kind in ("image", "video"))
        tokens = {  # tokens of each item, in flat order (a modality the model lacks has no items)
            "image": [layout.image_tokens()] * num_images if num_images else [],
            "audio": [layout.audio_tokens(n) for n in audio_frames],
            "video": [layout.video_tokens(n) for n in track_frames or [0] * num_videos],
        }
        first = dict.fromkeys(tokens, 0)
        for sample, ids in enumerate(input_ids):
            for kind, token_id in self.media_token_ids.items():
                items = len(per_sample[kind][sample])
                expected = sum(tokens[kind][first[kind] : first[kind] + items])
                first[kind] += items
                found = ids.count(token_id)
                if found != expected:
                    raise ValueError(
                        f"sample {sample}: {found} {self.placeholder(kind)} tokens after tokenization but its {kind}s "
                        f"need {expected}; the tokenizer must treat {self.placeholder(kind)} as one special token"
                    )

__all__ = ["MultimodalProcessor", "DEFAULT_CHAT_TEMPLATE", "ASSISTANT_PREFIX"]
