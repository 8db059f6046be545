"""Short clips of one shape moving in a straight line, encoded to mp4 with PyAV's bundled ffmpeg.

The encoder runs single-threaded with a fixed quality so the same frames give the same bytes.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .grammar import SIZES
from .images import background, draw_shape

# Preferred first; all decode with any ffmpeg-based reader.
VIDEO_CODECS = ("libx264", "mpeg4")
_TRAVEL = (0.25, 0.75)  # the shape's centre moves between these fractions of the frame side


def pick_codec() -> str:
    """The first codec in `VIDEO_CODECS` this PyAV build can encode."""
    for name in VIDEO_CODECS:
        try:
            av.Codec(name, "w")
            return name
        except Exception:  # PyAV raises UnknownCodecError or ValueError depending on the version
            continue
    raise RuntimeError(f"PyAV {av.__version__} can encode none of {VIDEO_CODECS}; install a PyAV wheel with ffmpeg.")


def motion_path(direction: str, size: int, rng: np.random.Generator) -> tuple[list[float], list[float]]:
    """Start and end centre (x, y) in pixels for a move in `direction`; the other axis is random."""
    start, end = (_TRAVEL[0] * size, _TRAVEL[1] * size)
    if direction in ("left", "up"):
        start, end = end, start
    across = round(rng.uniform(0.3, 0.7) * size, 2)
    if direction in ("left", "right"):
        return [start, across], [end, across]
    if direction in ("up", "down"):
        return [across, start], [across, end]
    raise ValueError(f"Unknown direction {direction!r}; expected left, right, up or down.")


def render_frames(
    colour: str, shape: str, size: str, direction: str, video_size: int, num_frames: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Frames (num_frames, H, W, 3) uint8 and the attributes that describe them."""
    start, end = motion_path(direction, video_size, rng)
    radius = round(SIZES[size] * video_size * rng.uniform(0.9, 1.1), 2)
    canvas = background(video_size, rng)
    frames = []
    for t in np.linspace(0.0, 1.0, num_frames):
        frame = canvas.copy()
        centre = (start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
        draw_shape(frame, shape, colour, centre, radius)
        frames.append(np.asarray(frame))
    attributes = {
        "colour": colour,
        "shape": shape,
        "size": size,
        "direction": direction,
        "start": start,
        "end": end,
        "radius": radius,
    }
    return np.stack(frames), attributes


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str) -> None:
    """Encode (frames, H, W, 3) uint8 RGB to an mp4 at `fps` frames per second."""
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.codec_context.thread_count = 1  # x264's output depends on its thread count
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "medium", "threads": "1"}
        else:
            stream.bit_rate = 2_000_000
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
