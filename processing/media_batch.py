"""Media given with a batch of texts -> one list per sample, checked against each text's placeholders.

The processor takes media of each kind per sample (a list holding one list per text, empty or None for none) or
flat in placeholder order (sample 0's first). A plain Python list is never a single item; a 4-D image array or
tensor is a batch of images (a 4-D video array is one video). Errors name the sample and the counts.
"""

import numpy as np
import torch

TOWERS = {"image": ("vision tower", "images"), "audio": ("audio tower", "audio"), "video": ("vision tower", "videos")}


def is_per_sample(media) -> bool:
    """A list whose every entry is a list (or None) gives media per sample; anything else is flat."""
    if not isinstance(media, (list, tuple)) or len(media) == 0:
        return False
    return all(m is None or isinstance(m, (list, tuple)) for m in media)


def flatten_media(media, kind: str) -> list:
    """Flat media as a list; a 4-D image array/tensor is a batch of images (a 4-D video array is one video)."""
    if kind == "image" and isinstance(media, (np.ndarray, torch.Tensor)) and media.ndim == 4:
        return list(media)
    return list(media) if isinstance(media, (list, tuple)) else [media]


def assign_media(kind: str, media, texts: list[str], token: str, supported: bool) -> list[list]:
    """Media of one kind as one list per sample, checked against the `token` placeholders of each text.

    `supported`: whether the model has the tower for `kind`; if not, media or placeholders of that kind are refused
    naming the missing tower.
    """
    counts = [sample.count(token) for sample in texts]
    if not supported and (media is not None or any(counts)):
        tower, items = TOWERS[kind]
        raise ValueError(
            f"this model has no {tower}, so it takes no {items}, but "
            + (f"{kind} inputs were given" if media is not None else f"sample {counts.index(max(counts))} contains {token}")
        )
    if media is None:
        for index, count in enumerate(counts):
            if count:
                raise ValueError(f"sample {index} has {count} {token} placeholder(s) but no {kind} was given")
        return [[] for _ in texts]
    if is_per_sample(media):
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
    flat = flatten_media(media, kind)
    if len(flat) != sum(counts):
        raise ValueError(
            f"the text has {sum(counts)} {token} placeholder(s) (per sample: {counts}) but {len(flat)} {kind}(s) "
            "were given; each placeholder takes exactly one item, in order"
        )
    bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
    return [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def locate(per_sample: list[list], flat_index: int) -> tuple[int, int, object]:
    """(sample, position in sample, item) of the flat_index-th item."""
    for sample, items in enumerate(per_sample):
        if flat_index < len(items):
            return sample, flat_index, items[flat_index]
        flat_index -= len(items)
    raise IndexError(flat_index)


def flags_per_video(use_audio_in_video, num_videos: int) -> list[bool]:
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


def with_frame_rates(videos: list, video_metadata) -> list:
    """Frame arrays with the frame rate their `video_metadata` gives (vLLM passes one dict per video when the video
    processor asks for it), as `{"frames", "fps"}` dicts; files and dicts keep their own. Frames sampled at
    `frames_indices` of a stream at `fps` are taken at the rate those indices give."""
    metadata = list(video_metadata) if isinstance(video_metadata, (list, tuple)) else [video_metadata]
    if len(metadata) != len(videos):
        raise ValueError(f"video_metadata has {len(metadata)} entries for {len(videos)} videos; give one per video")
    rated = []
    for video, meta in zip(videos, metadata):
        read = meta.get if isinstance(meta, dict) else lambda key, m=meta: getattr(m, key, None)
        fps, indices = read("fps"), read("frames_indices")
        if fps and indices and len(indices) > 1 and indices[-1] > indices[0]:
            fps = fps * (len(indices) - 1) / (indices[-1] - indices[0])
        is_array = isinstance(video, (np.ndarray, torch.Tensor))
        rated.append({"frames": video, "fps": float(fps)} if is_array and fps else video)
    return rated
