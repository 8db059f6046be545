"""Processor speed: our image processor against CLIPImageProcessorPil, seeking video sampling against decoding
every frame, and audio (resample + log-mel) throughput. One run; prints a table and writes JSON to --out.

    python benchmarks/bench_processors.py --out bench_processors.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import av
import numpy as np
import torch
import transformers
from transformers import CLIPImageProcessorPil, WhisperFeatureExtractor

from modeling_multimodal.processing import MultimodalImageProcessor
from modeling_multimodal.processing.audio_loading import load_audio, log_mel
from modeling_multimodal.processing.video_processing_multimodal import load_video


def best_time(function, repeats: int) -> float:
    """Fastest of `repeats` runs after one warm-up (seconds)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_images(num_images: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(240, 640, (num_images, 2))]
    ours, reference = MultimodalImageProcessor(), CLIPImageProcessorPil()  # both CLIP defaults: 224 px, bicubic
    ours_s = best_time(lambda: ours(images, return_tensors="pt"), repeats)
    reference_s = best_time(lambda: reference(images, return_tensors="pt"), repeats)
    difference = (ours(images)["pixel_values"] - reference(images, return_tensors="pt")["pixel_values"]).abs().max()
    return {
        "num_images": num_images,
        "ours_images_per_s": num_images / ours_s,
        "clip_pil_images_per_s": num_images / reference_s,
        "speedup": reference_s / ours_s,
        "max_abs_difference": float(difference),
    }


def make_video(path: str, num_frames: int, fps: int, size: tuple[int, int], gop: int) -> None:
    rng = np.random.default_rng(0)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "ultrafast"}
        for k in range(num_frames):
            image = np.full((size[0], size[1], 3), k % 256, np.uint8)
            image[: size[0] // 4, : size[1] // 4] = rng.integers(0, 256, (size[0] // 4, size[1] // 4, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_every_frame(path: str, num_frames: int) -> np.ndarray:
    """The baseline: decode and convert all frames, then keep `num_frames` evenly spaced ones."""
    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    keep = [int((i + 0.5) * len(frames) / num_frames) for i in range(num_frames)]
    return np.stack([frames[i] for i in keep])


def bench_video(seconds: int, fps: int, num_frames: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        make_video(path, seconds * fps, fps, (240, 320), gop=2 * fps)
        sampled, metadata = load_video(path, num_frames)
        assert np.array_equal(sampled, decode_every_frame(path, num_frames)), "seeking must return the same frames"
        ours_s = best_time(lambda: load_video(path, num_frames), repeats)
        full_s = best_time(lambda: decode_every_frame(path, num_frames), repeats)
    return {
        "video_seconds": seconds,
        "total_frames": metadata.total_num_frames,
        "num_frames": num_frames,
        "frames_decoded_by_sampling": metadata.num_decoded_frames,
        "sampling_s": ours_s,
        "decode_every_frame_s": full_s,
        "speedup": full_s / ours_s,
    }


def bench_audio(num_clips: int, clip_seconds: float, repeats: int) -> dict:
    extractor = WhisperFeatureExtractor()
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal((int(44100 * clip_seconds), 2))).astype(np.float32) for _ in range(num_clips)]

    def run():
        return [log_mel(extractor, load_audio(clip, 44100, extractor.sampling_rate)) for clip in clips]

    seconds = best_time(run, repeats)
    return {
        "num_clips": num_clips,
        "clip_seconds": clip_seconds,
        "input": "44.1 kHz stereo -> 16 kHz mono -> 80-bin log-mel",
        "audio_seconds_per_s": num_clips * clip_seconds / seconds,
        "clips_per_s": num_clips / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path of the JSON report")
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run)")
    args = parser.parse_args()
    scale = 0.25 if args.quick else 1.0
    report = {
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "pyav": av.__version__,
            "cpu_threads": torch.get_num_threads(),
        },
        "image": bench_images(max(8, int(64 * scale)), repeats=3),
        "video": bench_video(max(5, int(60 * scale)), fps=30, num_frames=8, repeats=3),
        "audio": bench_audio(max(2, int(8 * scale)), clip_seconds=10.0, repeats=3),
    }
    image, video, audio = report["image"], report["video"], report["audio"]
    print(
        f"image  ours {image['ours_images_per_s']:8.1f} img/s   CLIPImageProcessorPil {image['clip_pil_images_per_s']:8.1f} img/s"
        f"   speedup x{image['speedup']:.2f}   max |diff| {image['max_abs_difference']:.1e}"
    )
    print(
        f"video  sampling {video['sampling_s'] * 1e3:8.1f} ms ({video['frames_decoded_by_sampling']} of "
        f"{video['total_frames']} frames decoded)   decode every frame {video['decode_every_frame_s'] * 1e3:8.1f} ms"
        f"   speedup x{video['speedup']:.2f}"
    )
    print(f"audio  {audio['audio_seconds_per_s']:8.1f} audio seconds / s   ({audio['clips_per_s']:.1f} clips of 10 s / s)")
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
