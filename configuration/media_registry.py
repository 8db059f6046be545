"""Each media kind declared once: its model inputs and its placeholder.

Every list of media input names in the package (the model's, the training objective's, calibration's, the
data layer's) and every placeholder string is derived from `MEDIA`, so adding a modality or an input is one
entry here plus its encoder pass. `MediaTokenLayout` (media_tokens.py) says how many tokens an item becomes.
Which tower and projector encode a kind is still the model's code (`MultimodalModel.merge_media`): declared here
it would be a second statement that nothing reads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaKind:
    """One modality as the model sees it.

    inputs: the batch keys that carry it, the first being the one whose presence means "items of this kind given"
        (the rest are masks or companions, e.g. a video's own sound track).
    placeholder: the token written in the text where its features go (`<image>`), expanded by the processor.
    """

    name: str
    inputs: tuple[str, ...]
    placeholder: str


MEDIA = {
    kind.name: kind
    for kind in (
        # with tiling (`image_max_tiles`), `pixel_values` holds every crop and `image_tiles` each image's (rows, cols)
        MediaKind("image", ("pixel_values", "image_tiles"), "<image>"),
        MediaKind("audio", ("input_features", "input_features_mask"), "<audio>"),
        # a video's frames go through the vision tower (with `video_fps`, `video_frames` says how many of each video's
        # are real); its own sound track (`use_audio_in_video`) through the audio one
        MediaKind(
            "video", ("pixel_values_videos", "video_frames", "video_audio_features", "video_audio_features_mask"), "<video>"
        ),
    )
}
MODALITIES = tuple(MEDIA)  # ("image", "audio", "video"): the order the processor and the model handle them in
PLACEHOLDERS = {name: kind.placeholder for name, kind in MEDIA.items()}  # {"image": "<image>", ...}
MEDIA_INPUTS = tuple(name for kind in MEDIA.values() for name in kind.inputs)  # every media tensor a batch may carry
# Inputs transformers' `MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL` does not know (dropped after prefill by us).
VIDEO_TRACK_INPUTS = MEDIA["video"].inputs[2:]
PREFILL_ONLY_INPUTS = (*MEDIA["image"].inputs[1:], *MEDIA["video"].inputs[1:])

__all__ = ["MEDIA", "MEDIA_INPUTS", "MODALITIES", "PLACEHOLDERS", "PREFILL_ONLY_INPUTS", "VIDEO_TRACK_INPUTS", "MediaKind"]
