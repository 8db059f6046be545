"""Audio-visual demo clips: a grey shape moves across the frame while a voice says a colour.

The caption "a red circle moving left" needs both streams of the mp4: the colour is only spoken (espeak-ng,
muxed into the file as its AAC sound track with PyAV; the shape is drawn in one neutral grey), the shape and
its motion are only seen. Frames alone can at best guess the colour (1 in 6), the track alone the shape and
direction (1 in 16). It is what `use_audio_in_video` (task `av_video_caption`) is for.

Held out: a quarter of the (colour, shape, direction) combinations, drawn per seed with every pair of values
still in training (`grammar.held_out_combinations("av_video")`), make up the whole test split. Voices and speeds
are the speech task's training ones in every split (the word, not the voice, is what is held out here).
Written apart from `make_demo_data`, into its own folder, so the main demo's data and budgets are unchanged.
"""

from __future__ import annotations

import json
from fractions import Fraction
from os import PathLike
from pathlib import Path

import av
import numpy as np
import soundfile

from . import grammar
from .speech import SAMPLE_RATE, find_espeak, synthesize
from .videos import pick_codec, render_frames

SPLIT_SIZES = {"train": 1200, "validation": 48, "test": 96}
SHAPE_GREY = (90, 90, 90)  # every shape is this grey: its colour is only said
SHAPE_SIZE = "large"


def manifest_path(out_dir: str | PathLike, split: str) -> Path:
    """`out_dir/av_video_<split>.jsonl`; media paths inside it are relative to `out_dir`."""
    if split not in grammar.SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {grammar.SPLITS}.")
    return Path(out_dir) / f"av_video_{split}.jsonl"


def write_av_video(path: Path, frames: np.ndarray, fps: int, codec: str, speech: np.ndarray, offset: float) -> None:
    """Encode (frames, H, W, 3) uint8 RGB at `fps` into an mp4 with `speech` (int16 at 16 kHz) starting `offset`
    seconds in as its AAC sound track, silence elsewhere, as long as the frames."""
    seconds = len(frames) / fps
    track = np.zeros(round(seconds * SAMPLE_RATE), np.float32)
    start = round(offset * SAMPLE_RATE)
    words = speech[: len(track) - start].astype(np.float32) / 32768.0
    track[start : start + len(words)] = words
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.time_base = Fraction(1, fps)
        video.codec_context.thread_count = 1
        if codec == "libx264":
            video.options = {"crf": "10", "preset": "medium", "threads": "1"}
        audio = container.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "mono"
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())
        for begin in range(0, len(track), 1024):
            frame = av.AudioFrame.from_ndarray(track[None, begin : begin + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, begin
            container.mux(audio.encode(frame))
        container.mux(audio.encode())


def _rows(out_dir: Path, split: str, count: int, seed: int, video_size: int, num_frames: int, fps: int, codec, espeak) -> list[dict]:
    rng = np.random.default_rng([seed, list(grammar.COMBINATIONS).index("av_video"), grammar.SPLITS.index(split)])
    combinations = grammar.combinations_for_split("av_video", split, "combinations", seed)
    plan = [combinations[i] for _ in range(-(-count // len(combinations))) for i in rng.permutation(len(combinations))]
    (out_dir / "av_videos" / split).mkdir(parents=True, exist_ok=True)
    rows, spoken = [], {}
    for index, (colour, shape, direction) in enumerate(plan[:count]):
        voice = grammar.TRAIN_VOICES[int(rng.integers(len(grammar.TRAIN_VOICES)))]
        speed = grammar.SPEEDS[int(rng.integers(len(grammar.SPEEDS)))]
        if (colour, voice, speed) not in spoken:  # espeak-ng is deterministic: each word is synthesised once
            wav = out_dir / "av_videos" / "words" / f"{colour}_{voice}_{speed}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            synthesize(colour, voice, speed, wav, espeak)
            spoken[colour, voice, speed] = wav
        speech, _ = soundfile.read(spoken[colour, voice, speed], dtype="int16")
        frames, attributes = render_frames(SHAPE_GREY, shape, SHAPE_SIZE, direction, video_size, num_frames, rng)
        offset = round(float(rng.uniform(0.0, max(0.0, num_frames / fps - len(speech) / SAMPLE_RATE))), 3)
        relative = f"av_videos/{split}/{index:06d}.mp4"
        write_av_video(out_dir / relative, frames, fps, codec, speech, offset)
        attributes.update(colour=colour, voice=voice, speed=speed, speech_offset=offset, num_frames=num_frames, fps=fps)
        caption = grammar.av_video_caption(colour, shape, direction)
        rows.append({"id": f"av_video-{split}-{index:06d}", "video": relative, "caption": caption, "attributes": attributes})
    return rows


def make_av_demo_data(
    out_dir: str | PathLike, seed: int = 0, sizes: dict[str, int] | None = None, *, video_size: int = 64,
    num_frames: int = 12, fps: int = 6,
) -> dict:
    """Write the audio-visual clips and `av_video_<split>.jsonl` manifests (task `av_video_caption`) into `out_dir`;
    returns the metadata it writes to `av_video_meta.json`. `sizes` overrides any of `SPLIT_SIZES`."""
    out_dir = Path(out_dir)
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(grammar.SPLITS)
    if unknown:
        raise ValueError(f"Unknown split(s) {sorted(unknown)} in sizes; expected some of {grammar.SPLITS}.")
    espeak, codec = find_espeak(), pick_codec()
    for split in grammar.SPLITS:
        rows = _rows(out_dir, split, sizes[split], seed, video_size, num_frames, fps, codec, espeak)
        with open(manifest_path(out_dir, split), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    meta = {
        "seed": seed, "sizes": sizes, "video_size": video_size, "num_frames": num_frames, "fps": fps, "video_codec": codec,
        "held_out_combinations": sorted(map(list, grammar.held_out_combinations("av_video", seed))),
    }
    (out_dir / "av_video_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta
