"""MultimodalVideoProcessor: sampling real encoded videos (PyAV), fixed frame count, seeking, timestamps, save/load."""

import numpy as np
import pytest
import torch
from media_builders import frame_levels, make_video

from modeling_multimodal.processing import MultimodalImageProcessor, MultimodalVideoProcessor
from modeling_multimodal.processing.video_processing_multimodal import load_video, sample_indices


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    """30 frames at 10 fps, keyframe every 10, B-frames; frame k is gray level 8*k."""
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


SAMPLING_CASES = [  # (name, num_frames, fps, expected frame indices)
    ("uniform_4", 4, None, [3, 11, 18, 26]),
    ("uniform_6", 6, None, [2, 7, 12, 17, 22, 27]),
    ("fps_2_capped_to_4", 4, 2.0, [0, 10, 15, 25]),  # grid 0, 5, ..., 25 (6 points) spread over 4
    ("fps_1_exact", 3, 1.0, [0, 10, 20]),
    ("short_video_repeats", 40, None, [int((i + 0.5) * 30 / 40) for i in range(40)]),
]


@pytest.mark.parametrize("name, num_frames, fps, expected", SAMPLING_CASES, ids=[c[0] for c in SAMPLING_CASES])
def test_sampling_returns_requested_frames_and_timestamps(mp4, name, num_frames, fps, expected):
    frames, metadata = load_video(mp4, num_frames, fps)
    assert frames.shape == (num_frames, 48, 64, 3) and frames.dtype == np.uint8
    assert metadata.frames_indices == expected
    assert frame_levels(frames) == expected  # the decoded pixels are those frames
    assert metadata.timestamps == pytest.approx([k / 10 for k in expected])
    assert metadata.total_num_frames == 30 and metadata.fps == 10.0


def test_seeking_decodes_only_what_is_needed(tmp_path):
    path = make_video(tmp_path / "long.mp4", num_frames=200, gop=20, size=(32, 32))
    frames, metadata = load_video(path, 4)
    assert metadata.frames_indices == [25, 75, 125, 175]
    assert frame_levels(frames) == [k % 32 for k in metadata.frames_indices]  # gray level 8k wraps at 256
    assert metadata.num_decoded_frames < 60  # each wanted frame costs at most its GOP prefix, not all 200 frames


@pytest.mark.parametrize("codec, suffix", [("libvpx-vp9", "webm"), ("libx264", "mkv"), ("mpeg4", "avi")])
def test_other_containers(tmp_path, codec, suffix):
    path = make_video(tmp_path / f"clip.{suffix}", codec=codec)
    frames, metadata = load_video(path, 4)
    assert metadata.frames_indices == [3, 11, 18, 26] and frame_levels(frames) == [3, 11, 18, 26]
    assert metadata.timestamps == pytest.approx([0.3, 1.1, 1.8, 2.6])


def test_path_bytes_and_frame_array_agree(mp4):
    processor = MultimodalVideoProcessor(num_frames=4, size={"shortest_edge": 32}, crop_size=32)
    from_path = processor(str(mp4), return_metadata=True)
    from_bytes = processor(mp4.read_bytes())["pixel_values_videos"]
    assert from_path["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
    assert torch.equal(from_path["pixel_values_videos"], from_bytes)
    # all 30 decoded frames as an array, sampled the same way, give the same tensor
    all_frames, _ = load_video(mp4, 30)
    assert torch.equal(processor({"frames": all_frames, "fps": 10})["pixel_values_videos"], from_bytes)
    assert torch.equal(processor(torch.from_numpy(all_frames).permute(0, 3, 1, 2))["pixel_values_videos"], from_bytes)


def test_frames_go_through_the_image_pipeline():
    options = {"size": {"shortest_edge": 32}, "crop_size": 32}
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 52, 3), dtype=np.uint8)
    videos = MultimodalVideoProcessor(num_frames=4, **options)(frames)["pixel_values_videos"]
    images = MultimodalImageProcessor(**options)(list(frames))["pixel_values"]
    assert torch.equal(videos[0], images)


def test_metadata_of_arrays_and_batches():
    processor = MultimodalVideoProcessor(num_frames=4, size={"shortest_edge": 16}, crop_size=16)
    clips = [np.zeros((n, 20, 20, 3), np.uint8) for n in (2, 9)]
    out = processor([clips[0], {"frames": clips[1], "fps": 3.0}], return_metadata=True)
    assert out["pixel_values_videos"].shape == (2, 4, 3, 16, 16)
    first, second = out["video_metadata"]
    assert first.frames_indices == [0, 0, 1, 1] and first.frames_timestamps is None
    assert second.frames_indices == [1, 3, 5, 7] and second.timestamps == pytest.approx([1 / 3, 1.0, 5 / 3, 7 / 3])
    with pytest.raises(ValueError, match="fps sampling of a frame array needs its frame rate"):
        processor(clips[1], fps=2.0)


def test_sample_indices_always_returns_the_count():
    times = [i / 25 for i in range(250)]
    for num_frames in (1, 4, 8, 300):
        for fps in (None, 0.5, 2.0, 100.0):
            indices = sample_indices(times, num_frames, fps)
            assert len(indices) == num_frames and indices == sorted(indices)
            assert 0 <= min(indices) and max(indices) < 250


def test_save_and_load_round_trip(tmp_path):
    processor = MultimodalVideoProcessor(num_frames=6, fps=2.0, size={"shortest_edge": 24}, crop_size=24)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "video_preprocessor_config.json").exists()
    loaded = MultimodalVideoProcessor.from_pretrained(tmp_path)
    assert (loaded.num_frames, loaded.fps) == (6, 2.0) and loaded.to_dict() == processor.to_dict()
