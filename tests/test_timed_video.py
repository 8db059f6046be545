"""Timed video (issue 30): frames sampled at `video_fps` (each video's count follows its length, bounded by
`video_num_frames`) and `video_timestamps` ("<t=1.5s>" before each time step's tokens).

Checked against the rule written out here, on one batch of videos of several lengths: the processor's placeholders
and timestamps, the model's merged features, `_get_num_multimodal_tokens`, the collators, the length estimate,
batched == one-by-one generation and a save / load round trip agree.
"""

import datasets
import numpy as np
import pytest
import torch
from media_builders import make_av_video, make_video

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.configuration.media_tokens import frames_at_rate
from modeling_multimodal.data import ExampleEncoder, MultimodalCollator, load_manifest
from modeling_multimodal.processing import MultimodalProcessor
from modeling_multimodal.processing.video_processing_multimodal import load_video, sampled_frame_times
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.training.packing import PackingCollator

TOKENIZER = tiny_tokenizer("bpe")  # byte level: the timestamp text decodes back exactly
TIMED = dict(video_fps=2, video_num_frames=8, video_temporal_pool_stride=2)  # tiny_config: 2x2 tokens per time step
# frame arrays at 4 fps: 1 s, 2.5 s, 10 s long -> 2, 5 and 20 frames at 2 fps -> kept 2, 4 and 8 (the most)
LENGTHS, KEPT = (4, 10, 40), (2, 4, 8)


def build(**overrides):
    torch.manual_seed(0)
    return MultimodalForConditionalGeneration(tiny_config(TOKENIZER, **{**TIMED, **overrides})).eval()


def videos(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [{"frames": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "fps": 4} for n in lengths]


@pytest.fixture(scope="module")
def timed():
    model = build(video_timestamps=True)
    return model, MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)


FRAME_CASES = [  # (frames the rate gives, most, multiple, kept)
    (5, 8, 2, 4), (20, 8, 2, 8), (1, 8, 2, 2), (7, 8, 1, 7), (9, 9, 3, 9), (8, 9, 3, 6),
]


@pytest.mark.parametrize("rate_frames, most, multiple, kept", FRAME_CASES)
def test_frames_at_rate_bounds_and_rounds_to_whole_steps(rate_frames, most, multiple, kept):
    assert frames_at_rate(rate_frames, most, multiple) == kept


def test_sampling_at_a_rate_keeps_more_frames_of_longer_videos(tmp_path):
    path = make_video(tmp_path / "clip.mp4", num_frames=30, fps=10)  # 3 s: 2 fps gives 6 grid points, 0.5 s apart
    frames, metadata = load_video(path, 8, fps=2.0, frame_multiple=2)
    assert frames.shape[0] == 6 and metadata.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert sampled_frame_times(path, 8, 2.0, 2) == pytest.approx(metadata.timestamps)  # from the packets alone
    frames, _ = load_video(path, 4, fps=2.0, frame_multiple=2)  # capped at 4, spread over the 6 grid points
    assert frames.shape[0] == 4
    frames, _ = load_video(path, 4, fps=2.0)  # without frame_multiple: the fixed count, as before
    assert frames.shape[0] == 4


def test_processor_counts_times_and_model_features_agree(timed):
    model, processor = timed
    layout = model.config.token_layout
    batch = processor(text=["<video> a", "b <video> c <video>"], videos=[videos()[:1], videos()[1:]], return_metadata=True)
    assert batch["video_frames"].tolist() == list(KEPT)
    assert batch["pixel_values_videos"].shape == (3, 8, 3, 32, 32)
    assert batch["pixel_values_videos"][0, 2:].abs().sum() == 0  # padding after the first video's 2 frames
    expected = [layout.video_tokens(0, kept) for kept in KEPT]
    assert expected == [4 * kept // 2 for kept in KEPT]  # 2x2 tokens per step of 2 frames
    placeholders = (batch["input_ids"] == model.config.video_token_id).sum(-1).tolist()
    assert placeholders == [expected[0], expected[1] + expected[2]]
    counts = processor._get_num_multimodal_tokens(video_sizes=[(5, 32, 32), (20, 32, 32)])
    assert counts["num_video_tokens"] == [layout.video_tokens(0, 4), layout.video_tokens(0, 8)]
    # each step's time (its first frame's) as text before its tokens: 5 grid points at 2 fps spread over 4 frames keep
    # 0, 0.5, 1.5, 2 s (steps at 0 and 1.5 s); 20 points over 8 keep 0.5, 1.5, 3, 4, 5.5, 6.5, 8, 9 s
    assert [m.timestamps[::2] for m in batch["video_metadata"][1:]] == [[0.0, 1.5], [0.5, 3.0, 5.5, 8.0]]
    steps = lambda times: "".join(f"<t={t:.1f}s>" + "<video>" * 4 for t in times)  # noqa: E731
    assert TOKENIZER.decode(batch["input_ids"][1]) == f"b {steps([0.0, 1.5])} c {steps([0.5, 3.0, 5.5, 8.0])}"
    with torch.no_grad():
        features = model.get_video_features(batch["pixel_values_videos"], video_frames=batch["video_frames"]).pooler_output
        merged = model.model.merge_media(batch["input_ids"], pixel_values_videos=batch["pixel_values_videos"], video_frames=batch["video_frames"])
    assert [f.shape[0] for f in features] == expected
    mask = batch["input_ids"] == model.config.video_token_id
    torch.testing.assert_close(merged.inputs_embeds[mask], torch.cat(features))


def test_a_videos_features_do_not_depend_on_its_batch(timed):
    model, processor = timed
    batch = processor(text=["<video><video><video>"], videos=[videos()])
    with torch.no_grad():
        together = model.get_video_features(batch["pixel_values_videos"], video_frames=batch["video_frames"]).pooler_output
        for index, video in enumerate(videos()):
            alone = processor(text=["<video>"], videos=[[video]])
            assert alone["pixel_values_videos"].shape[1] == KEPT[index]  # no padding alone
            (features,) = model.get_video_features(alone["pixel_values_videos"], video_frames=alone["video_frames"]).pooler_output
            torch.testing.assert_close(together[index], features)


def test_batched_generation_equals_one_by_one(timed):
    model, processor = timed
    texts, per_sample = ["<video> a", "b <video>", "<video>"], [[v] for v in videos()]
    batch = processor(text=texts, videos=per_sample, padding_side="left")
    generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for row, (text, media) in enumerate(zip(texts, per_sample)):
        one = model.generate(**processor(text=[text], videos=[media]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert generated[row, -4:].tolist() == one[0, -4:].tolist()


def test_collators_and_length_estimate_follow_each_videos_frames(timed, tmp_path):
    model, processor = timed
    for index, frames in enumerate((10, 25, 60)):  # at 10 fps: 1 s, 2.5 s and 6 s -> 2, 4 and 8 frames at 2 fps
        make_video(tmp_path / f"{index}.mp4", num_frames=frames, fps=10, size=(32, 32))
    rows = [{"id": f"vid-{i}", "video": f"{i}.mp4", "caption": "a big blue square moving right"} for i in range(3)]
    dataset = load_manifest(datasets.Dataset.from_list(rows), tmp_path, task="video_caption")
    encoder = ExampleEncoder(processor, task="video_caption")
    encoded = [encoder(row) for row in dataset]
    assert [int(e["video_frames"][0]) for e in encoded] == [2, 4, 8]
    assert [encoder.estimate_length(row) for row in dataset] == [len(e["input_ids"]) for e in encoded]
    for batch in (MultimodalCollator(TOKENIZER.pad_token_id)(encoded), PackingCollator(TOKENIZER.pad_token_id, 400)(encoded)):
        assert batch["pixel_values_videos"].shape[1] == 8 and sorted(batch["video_frames"].tolist()) == [2, 4, 8]
        with torch.no_grad():
            loss = model(**{k: v for k, v in batch.items() if k != "segment_ids"}).loss
        assert torch.isfinite(loss)


def test_sound_tracks_interleave_with_each_videos_own_steps(timed, tmp_path):
    model, processor = timed
    paths = [str(make_av_video(tmp_path / f"{seconds}.mp4", video_seconds=seconds, fps=10)) for seconds in (1.0, 3.0)]
    batch = processor(text=["<video> a <video>"], videos=[paths], use_audio_in_video=True, return_metadata=True)
    frames = batch["video_frames"].tolist()
    assert frames == [2, 6]
    tracks = batch["video_audio_features_mask"].sum(-1).tolist()
    layout = model.config.token_layout
    steps = [layout.video_token_steps(int(track), count) for track, count in zip(tracks, frames)]
    assert [len(s) for s in steps] == [1, 3]
    with torch.no_grad():
        merged = model.model.get_video_features(
            batch["pixel_values_videos"], batch["video_audio_features"], batch["video_audio_features_mask"], video_frames=batch["video_frames"]
        ).pooler_output
        plain = model.model.encode_videos(batch["pixel_values_videos"], video_frames=batch["video_frames"])
        audio, _, _ = model.model.encode_audio(batch["video_audio_features"], batch["video_audio_features_mask"])
    for video, track, video_steps, features in zip(plain, audio, steps, merged):
        pieces, frame_at, track_at = [], 0, 0
        for frame_tokens, track_tokens in video_steps:  # each step's frames, then its window of the track
            pieces += [video[frame_at : frame_at + frame_tokens], track[track_at : track_at + track_tokens]]
            frame_at, track_at = frame_at + frame_tokens, track_at + track_tokens
        torch.testing.assert_close(features, torch.cat(pieces))
    assert sum(f.shape[0] for f in merged) == int((batch["input_ids"] == model.config.video_token_id).sum())


def test_round_trip(timed, tmp_path):
    model, processor = timed
    batch = processor(text=["<video> a", "<video>"], videos=[videos()[:1], videos()[2:]])
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = MultimodalForConditionalGeneration.from_pretrained(tmp_path).eval(), MultimodalProcessor.from_pretrained(tmp_path)
    assert (reloaded.config.video_fps, reloaded.config.video_timestamps) == (2, True)
    again = reprocessor(text=["<video> a", "<video>"], videos=[videos()[:1], videos()[2:]])
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["video_frames"], batch["video_frames"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**again).logits, logits)


def test_bad_frame_counts_and_rates_are_refused(timed):
    model, processor = timed
    pixels = torch.zeros(2, 8, 3, 32, 32)
    with pytest.raises(ValueError, match=r"video 1: a video has 3 frames; .* whole time steps of video_temporal_pool_stride=2"):
        model.get_video_features(pixels, video_frames=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="video_frames says 10 frames but pixel_values_videos holds 8"):
        model.get_video_features(pixels, video_frames=torch.tensor([10, 2]))
    with pytest.raises(ValueError, match="fps=4 but the model samples videos at video_fps=2"):
        processor(text=["<video>"], videos=videos()[:1], fps=4)
    with pytest.raises(ValueError, match="video_fps must be a positive number"):
        tiny_config(TOKENIZER, video_fps=0)
    no_rate = np.zeros((4, 32, 32, 3), dtype=np.uint8)  # a bare frame array: neither rate sampling nor times
    with pytest.raises(ValueError, match=r"sample 0, video 0 .*fps sampling of a frame array needs its frame rate"):
        processor(text=["<video>"], videos=[no_rate])
    fixed = MultimodalProcessor.from_config_and_components(tiny_config(TOKENIZER, video_timestamps=True), TOKENIZER)
    with pytest.raises(ValueError, match=r"video 0: video_timestamps needs each sampled frame's time"):
        fixed(text=["<video>"], videos=[no_rate])


def test_fixed_frames_stay_the_default():
    config = tiny_config(TOKENIZER)
    assert config.video_fps is None and config.video_timestamps is False
    processor = MultimodalProcessor.from_config_and_components(config, TOKENIZER)
    batch = processor(text=["<video>"], videos=videos()[2:])
    assert "video_frames" not in batch and batch["pixel_values_videos"].shape[1] == config.video_num_frames
    untimed = build()  # a rate without timestamps: the counts follow the frames, no text is added
    plain = MultimodalProcessor.from_config_and_components(untimed.config, TOKENIZER)(text=["<video>"], videos=videos()[:1])
    ids = plain["input_ids"][0]
    assert (ids == untimed.config.video_token_id).sum() == len(ids) == untimed.config.token_layout.video_tokens(0, 2) == 4
