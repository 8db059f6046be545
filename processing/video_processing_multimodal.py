"""MultimodalVideoProcessor: PyAV decoding, frame sampling, then the image pipeline on the frames.

transformers v5's video processors all need torchvision; this one needs PyAV only. What is unusual:

- The model takes a FIXED number of frames per video (`num_frames`, from `MediaTokenLayout`), so a
  video's token count never depends on its length. Every video comes back with exactly `num_frames`
  frames: uniform sampling takes the middle frame of `num_frames` equal segments (a video shorter
  than that repeats frames); `fps` sampling takes a grid at that rate and then picks `num_frames`
  frames uniformly from the grid (a cap for long videos, repetition for short ones). With `frame_multiple`
  (the model's `video_fps`), a video keeps the frames the rate gives instead (at most `num_frames`, whole time
  steps), so its length decides its frame count; the batch is zero-padded and `video_frames` gives each count.
- Only what is needed is decoded. One demux pass (packets only, nothing decoded) gives every
  frame's timestamp and every keyframe; then, for each wanted frame, the decoder seeks to the
  keyframe before it unless it is already decoding forward from a point at or after that keyframe.
- The sampled frames' real timestamps (from the stream, not `index / fps`) and indices are returned
  as `SampledVideoMetadata`, with the number of frames actually decoded.
- Bounded before decoding: paths must be regular files (a FIFO or device is refused, never read) and
  a frame may hold at most `max_image_pixels` pixels (the image processor's limit), checked from the
  stream header. A file whose container lists more frames than its data holds (a truncated download)
  is refused, naming both counts; a sampled frame the decoder rejects (a corrupt packet) is replaced
  by the next decodable one with a warning.

Inputs: a path or bytes of any container ffmpeg reads (mp4, webm, mkv, avi, ...); a 4-D frame array
(numpy (T, H, W, C), torch (T, C, H, W) or (T, H, W, C)); or `{"frames": array_or_list_of_images,
"fps": float}` when the frame rate of an array is known (needed for `fps` sampling and timestamps).
A plain Python list is never one video: it is a list of videos.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
import os
from dataclasses import dataclass

import av
import numpy as np
import torch
from huggingface_hub.dataclasses import validate_typed_dict
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata

from ..configuration.media_tokens import frames_at_rate
from .image_processing_multimodal import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MediaInputError,
    check_pixels,
    describe,
    load_image,
    preprocess_rgb_arrays,
)
from .audio_loading import SoundTrackRequest, read_sound_track
from .media_files import open_media_file


logger = logging.getLogger(__name__)


@dataclass
class SampledVideoMetadata(VideoMetadata):
    """transformers' `VideoMetadata` plus the real timestamps of the sampled frames and the decode cost."""

    frames_timestamps: list[float] | None = None
    num_decoded_frames: int | None = None

    @property
    def timestamps(self) -> list[float]:
        """Timestamps (seconds from the first frame) of the sampled frames."""
        if self.frames_timestamps is not None:
            return self.frames_timestamps
        return super().timestamps


# --- which frames ---------------------------------------------------------------------------------
def spread(count: int, num_frames: int) -> list[int]:
    """`num_frames` positions in range(count): the middle of `num_frames` equal segments (repeats when count < num_frames)."""
    return [min(count - 1, int((i + 0.5) * count / num_frames)) for i in range(num_frames)]


def sample_indices(times: list[float], num_frames: int, fps: float | None, frame_multiple: int | None = None) -> list[int]:
    """Indices of the frames to keep, given every frame's time (seconds, sorted). `num_frames` of them, or with
    `fps` and `frame_multiple` as many as the rate gives (`frames_at_rate`: at most `num_frames`, a multiple of
    `frame_multiple`), so a longer video keeps more frames.

    fps=None: uniform over the frames. fps=f: the grid 0, 1/f, 2/f, ... up to the last frame, each point
    snapped to the first frame at or after it (half a frame of tolerance), then `spread` over the grid.
    """
    if fps is None:
        return spread(len(times), num_frames)
    step = 1.0 / fps
    tolerance = 0.5 * (times[-1] - times[0]) / max(len(times) - 1, 1)
    grid, index, target = [], 0, times[0]
    while target <= times[-1] + tolerance:
        index = bisect.bisect_left(times, target - tolerance, lo=index)
        grid.append(min(index, len(times) - 1))
        target += step
    count = num_frames if frame_multiple is None else frames_at_rate(len(grid), num_frames, frame_multiple)
    return [grid[i] for i in spread(len(grid), count)]


# --- decoding -------------------------------------------------------------------------------------
def _demux_index(container, stream) -> tuple[list[int], list[int], int]:
    """Sorted presentation timestamps of every frame and of every keyframe, from packets alone (no decoding),
    and the number of packets in the file (empty or timestamp-less ones too; not the demuxer's final flush)."""
    frame_pts, key_pts, packets = [], [], 0
    for packet in container.demux(stream):
        packets += bool(packet.size or packet.pts is not None or packet.dts is not None)
        if packet.pts is None or packet.size == 0:
            continue
        frame_pts.append(packet.pts)
        if packet.is_keyframe:
            key_pts.append(packet.pts)
    return sorted(frame_pts), sorted(key_pts), packets


def _decoded_frames(container, stream):
    """Frames decoded from the current position on, skipping packets the decoder rejects (corrupt data)."""
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def _decode_at(container, stream, wanted_pts: list[int], key_pts: list[int]) -> tuple[dict, int]:
    """Decode the frames at `wanted_pts` (sorted, unique), seeking only when it saves decoding.

    The decoder seeks to the keyframe before a wanted frame unless it already decodes forward from a point
    at or after that keyframe. Returns ({wanted pts: av.VideoFrame}, frames decoded). A wanted frame the
    decoder skips (a corrupt packet) is replaced by the next decodable one; past the end, by the last one.
    """
    found, decoded = {}, 0
    frames, position, last = None, None, None  # decoder iterator, pts of the last decoded frame, that frame
    for pts in wanted_pts:
        keyframe = key_pts[bisect.bisect_right(key_pts, pts) - 1] if key_pts and key_pts[0] <= pts else None
        if frames is None or (keyframe is not None and position is not None and keyframe > position):
            container.seek(keyframe if keyframe is not None else pts, stream=stream, backward=True, any_frame=False)
            frames = _decoded_frames(container, stream)
        while position is None or position < pts:
            frame = next(frames, None)
            if frame is None:  # end of stream
                break
            decoded, last = decoded + 1, frame
            position = frame.pts if frame.pts is not None else position
        if last is not None:
            found[pts] = last
    return found, decoded


def frames_span(times: list[float], average_rate: float | None) -> float:
    """Seconds a video's frames cover (`SampledVideoMetadata.duration`): first frame to last, plus one frame."""
    return times[-1] + (1.0 / average_rate if average_rate else 0.0)


def _file_frame_times(path: str) -> tuple[list[float], float | None]:
    """Every frame's time (seconds from the first) and the average rate of a video file, from its packets alone."""
    name = describe(path)
    with open_media_file(path, name) as source, av.open(source) as container:
        if not container.streams.video:
            raise ValueError(f"{name} has no video stream")
        stream = container.streams.video[0]
        frame_pts, _, _ = _demux_index(container, stream)
        if not frame_pts:
            raise ValueError(f"{name} has zero decodable video frames")
        times = [float((pts - frame_pts[0]) * stream.time_base) for pts in frame_pts]
        return times, float(stream.average_rate) if stream.average_rate else None


def video_file_span(path: str) -> float:
    """`frames_span` of a video file from its packets alone (nothing decoded): the duration `load_video` reports,
    for length estimates (`use_audio_in_video` fits the sound track to it)."""
    return frames_span(*_file_frame_times(path))


def sampled_frame_times(video, num_frames: int, fps: float | None, frame_multiple: int | None = None) -> list[float]:
    """The times `load_video` gives the frames it samples (`SampledVideoMetadata.timestamps`), without decoding: from
    the packets of a file, from the length and `fps` of a `{"frames", "fps"}` dict. For token counts from headers."""
    if isinstance(video, (str, os.PathLike)):
        times, _ = _file_frame_times(os.fspath(video))
    elif isinstance(video, dict) and video.get("fps") and "frames" in video:
        times = [i / video["fps"] for i in range(len(video["frames"]))]
    else:
        raise ValueError(f"frame times are read from a video file or a {{frames, fps}} dict, got {describe(video)}")
    return [round(times[index], 6) for index in sample_indices(times, num_frames, fps, frame_multiple)]


def _read_video_file(
    source: str | bytes, name: str, num_frames: int, fps: float | None, max_pixels: int | None,
    sound_track: SoundTrackRequest | None = None, frame_multiple: int | None = None,
):
    """Decode `num_frames` sampled frames of a video file: ((num_frames, H, W, 3) uint8, metadata, track), with its
    sound track (`read_sound_track`: (samples, seconds)) read in the same pass when `sound_track` asks for it."""
    stream_source = open_media_file(source, name) if isinstance(source, str) else io.BytesIO(source)
    try:
        with stream_source, av.open(stream_source) as container:
            if not container.streams.video:
                raise ValueError(f"{name} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            check_pixels(stream.codec_context.height, stream.codec_context.width, max_pixels, f"each frame of {name}")
            frame_pts, key_pts, packets = _demux_index(container, stream)
            if not frame_pts:
                raise ValueError(f"{name} has zero decodable video frames")
            if stream.frames and packets < stream.frames:
                raise ValueError(
                    f"{name} is truncated or damaged: its header lists {stream.frames} video frames but only "
                    f"{packets} are in the file"
                )
            times = [float((pts - frame_pts[0]) * stream.time_base) for pts in frame_pts]
            indices = sample_indices(times, num_frames, fps, frame_multiple)
            found, decoded = _decode_at(container, stream, sorted({frame_pts[i] for i in indices}), key_pts)
            if not found:
                raise ValueError(f"{name} has zero decodable video frames")
            arrays, kept = {}, []
            for index in indices:
                frame = found[frame_pts[index]]
                if id(frame) not in arrays:
                    check_pixels(frame.height, frame.width, max_pixels, f"a decoded frame of {name}")
                    arrays[id(frame)] = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
                # the frame actually kept: the wanted one, or its stand-in when that one did not decode
                kept.append((bisect.bisect_left(frame_pts, frame.pts) if frame.pts is not None else index, id(frame)))
            average_rate = float(stream.average_rate) if stream.average_rate else None
            duration = frames_span(times, average_rate)
            track = None if sound_track is None else read_sound_track(container, name, sound_track, duration)
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode {name} as video: {err}") from err
    replaced = sorted({index for index, (kept_index, _) in zip(indices, kept) if kept_index != index})
    if replaced:
        logger.warning(
            f"{name}: sampled frame(s) {replaced} did not decode at their timestamps (a corrupt packet, or timestamps "
            "the container does not keep, as in AVI with B-frames); the next decodable frame stands in for each"
        )
    frames = np.stack([arrays[key] for _, key in kept])  # (num_frames, H, W, 3)
    metadata = SampledVideoMetadata(
        total_num_frames=len(frame_pts),
        fps=average_rate,
        width=frames.shape[2],
        height=frames.shape[1],
        duration=duration,
        video_backend="pyav",
        frames_indices=[index for index, _ in kept],
        frames_timestamps=[round(times[min(index, len(times) - 1)], 6) for index, _ in kept],
        num_decoded_frames=decoded,
    )
    return frames, metadata, track


def _sample_frame_array(
    frames, video_fps: float | None, num_frames: int, fps: float | None, max_pixels: int | None, frame_multiple: int | None = None
):
    """Sample an in-memory video (4-D array/tensor or list of images): ((num_frames, H, W, 3) uint8, metadata)."""
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim != 4:
        raise ValueError(f"a video array must be 4-D (frames, H, W, C) or (frames, C, H, W), got shape {tuple(frames.shape)}")
    count = len(frames)
    if count == 0:
        raise ValueError("the video has zero frames")
    if fps is not None and video_fps is None:
        raise ValueError('fps sampling of a frame array needs its frame rate: pass {"frames": ..., "fps": ...}')
    step = 1.0 / video_fps if video_fps else 1.0
    indices = sample_indices([i * step for i in range(count)], num_frames, fps, frame_multiple)
    loaded = {index: load_image(frames[index], max_pixels=max_pixels) for index in sorted(set(indices))}
    if len({image.shape for image in loaded.values()}) > 1:
        raise ValueError("the video's frames have different sizes")
    first = next(iter(loaded.values()))
    metadata = SampledVideoMetadata(
        total_num_frames=count,
        fps=video_fps,
        width=first.shape[1],
        height=first.shape[0],
        duration=count / video_fps if video_fps else None,
        video_backend="array",
        frames_indices=indices,
        frames_timestamps=[round(i * step, 6) for i in indices] if video_fps else None,
        num_decoded_frames=len(loaded),
    )
    return np.stack([loaded[i] for i in indices]), metadata


def load_video(
    video, num_frames: int, fps: float | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    frame_multiple: int | None = None,
):
    """Any supported video form -> ((frames, H, W, 3) uint8, SampledVideoMetadata). Raises `ValueError`.

    `num_frames` frames (with `fps` and `frame_multiple`, as many as `sample_indices` gives); `max_pixels` bounds each
    frame (height * width; `None`: no limit), from the stream header for files.
    """
    if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
        return _read_video_file(*_file_source(video), num_frames, fps, max_pixels, frame_multiple=frame_multiple)[:2]
    if isinstance(video, dict):
        if "frames" not in video:
            raise ValueError(f"a video dict needs a 'frames' key (and optionally 'fps'), got keys {sorted(video)}")
        return _sample_frame_array(video["frames"], video.get("fps"), num_frames, fps, max_pixels, frame_multiple)
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return _sample_frame_array(video, None, num_frames, fps, max_pixels, frame_multiple)
    raise ValueError(
        f"unsupported video type {type(video).__name__}; expected a path, bytes, a 4-D frame array/tensor "
        'or {"frames": ..., "fps": ...}'
    )


def _file_source(video) -> tuple[str | bytes, str]:
    """(what `_read_video_file` opens, its name in errors) of a path or bytes."""
    if isinstance(video, (str, os.PathLike)):
        return os.fspath(video), describe(video)
    return bytes(video), f"video bytes ({len(video)} bytes)"


def flatten_videos(videos) -> list:
    """One video, a list of videos, or a per-sample list of lists -> flat list of videos."""
    if not isinstance(videos, (list, tuple)):
        return [videos]
    flat = []
    for item in videos:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


# --- the processor --------------------------------------------------------------------------------
class MultimodalVideosKwargs(VideosKwargs, total=False):
    """`VideosKwargs` as transformers defines them (`num_frames`, `fps`, `return_metadata`, image options), plus
    the per-frame pixel limit."""

    max_image_pixels: int | None
    sound_tracks: list | None  # one `SoundTrackRequest` (or None) per video: read that file's sound track too
    frame_multiple: int | None  # with fps: each video keeps as many frames as the rate gives, a multiple of this


class MultimodalVideoProcessor(VideoProcessorMixin):
    r"""
    Video processor without torchvision: PyAV decoding with seeking, fixed-count frame sampling, CLIP-style frames.

    Returns `pixel_values_videos` float32 `(n_videos, num_frames, 3, crop_height, crop_width)` and, with
    `return_metadata=True`, `video_metadata`: one `SampledVideoMetadata` per video (`frames_indices`,
    `timestamps`, `fps`, `total_num_frames`, `num_decoded_frames`). Frames go through exactly the image
    processor's pipeline (`preprocess_rgb_arrays`), so a frame equals that frame given as an image.

    Args:
        num_frames (`int`, defaults to 8): frames per video, always returned exactly (the model's fixed count).
        fps (`float`, *optional*): sample at this rate (then fit to `num_frames`); `None` samples uniformly.
        frame_multiple (`int`, *optional*): with `fps`, do not fit to `num_frames`: each video keeps the frames the rate
            gives, at most `num_frames`, rounded down to a multiple of this (the model's time step). `pixel_values_videos`
            is then zero-padded to the longest video and `video_frames` (n_videos,) holds each video's count.
        max_image_pixels (`int`, *optional*, defaults to 2**26): frames with more pixels are refused with a
            `ValueError` (from the stream header, before decoding, for files); `None` disables the check.
        Image options as `MultimodalImageProcessor` (`size`, `crop_size`, `resample`, `image_mean`, ...).
    Saves and loads `video_preprocessor_config.json`.
    """

    valid_kwargs = MultimodalVideosKwargs
    model_input_names = ["pixel_values_videos"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    # The frames are always sampled to `num_frames` (uniformly, or at `fps`) with no metadata needed, so the processor
    # does not ask callers for any (vLLM requires video metadata from processors that set this)
    do_sample_frames = False
    num_frames = 8
    fps = None
    return_metadata = False
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
    frame_multiple = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        """No network: paths and bytes are decoded in `load_video`."""
        return video_url_or_urls

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        """Decode, sample and transform `videos` (one, a list, or per-sample lists; see the module docstring)."""
        validate_typed_dict(self.valid_kwargs, kwargs)
        for name in self._valid_kwargs_names:
            kwargs.setdefault(name, getattr(self, name, None))
        kwargs = self._standardize_kwargs(**kwargs)
        self._validate_preprocess_kwargs(**kwargs)
        num_frames, fps = kwargs["num_frames"], kwargs["fps"]
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number or None, got {fps!r}")

        flat = flatten_videos(videos)
        requests = kwargs.get("sound_tracks") or [None] * len(flat)
        multiple = kwargs.get("frame_multiple") if fps is not None else None
        clips, metadata, tracks = [], [], []
        for index, (video, request) in enumerate(zip(flat, requests)):
            try:
                if request is None:
                    frames, video_metadata = load_video(video, num_frames, fps, kwargs["max_image_pixels"], multiple)
                    track = None
                else:  # frames and sound track in one pass over the file (`use_audio_in_video`)
                    frames, video_metadata, track = _read_video_file(
                        *_file_source(video), num_frames, fps, kwargs["max_image_pixels"], request, multiple
                    )
            except ValueError as err:
                raise MediaInputError("video", index, str(err)) from err
            clips.append(frames)
            metadata.append(video_metadata)
            tracks.append(track)
        if not clips:
            raise ValueError("no videos were given")

        names = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor")
        names += ("do_normalize", "image_mean", "image_std")
        frames = [frame for clip in clips for frame in clip]
        pixel_values = preprocess_rgb_arrays(frames, **{name: kwargs[name] for name in names})  # (all frames, 3, H, W)
        counts = [len(clip) for clip in clips]
        padded = pixel_values.new_zeros(len(clips), max(counts), *pixel_values.shape[1:])  # (videos, frames, 3, H, W)
        for row, (clip, count) in enumerate(zip(pixel_values.split(counts), counts)):
            padded[row, :count] = clip
        data = {"pixel_values_videos": padded}
        if multiple is not None:
            data["video_frames"] = torch.tensor(counts, dtype=torch.long)
        if kwargs.get("return_tensors") == "np":
            data = {key: value.numpy() for key, value in data.items()}
        if kwargs.get("sound_tracks"):
            data["video_sound_tracks"] = tracks  # (samples, track seconds) per video, None where not asked for
        if kwargs["return_metadata"]:
            data["video_metadata"] = metadata
        return BatchFeature(data=data)


__all__ = ["MultimodalVideoProcessor", "SampledVideoMetadata", "load_video", "sample_indices", "sampled_frame_times", "video_file_span"]
