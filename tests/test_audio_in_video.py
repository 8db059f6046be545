"""use_audio_in_video: a video file's sound track read with its frames, interleaved by time window.

Layouts are checked against hand-computed numbers; the model's interleaved features against its frame and
audio encoders run apart; batching, packing and generation against the same samples run alone.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import soundfile
import torch
from media_builders import make_av_video, make_video, make_video_with_corrupt_audio, tiny_processor

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.configuration.media_tokens import MediaTokenLayout
from modeling_multimodal.data.collator import MultimodalCollator
from modeling_multimodal.data.examples import ExampleEncoder, TaskSpec, load_manifest
from modeling_multimodal.processing.audio_loading import load_audio, load_video_track, log_mel
from modeling_multimodal.processing.video_processing_multimodal import load_video
from modeling_multimodal.testing_utils import tiny_config, tiny_tokenizer
from modeling_multimodal.training.packing import PackingCollator

TOKENIZER = tiny_tokenizer()
PROCESSOR = tiny_processor(TOKENIZER)
VIDEO_ID = PROCESSOR.media_token_ids["video"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """2.1 s of frames at 10 fps with a sine track as long (AAC in mp4), and 2 s of frames without a track."""
    folder = tmp_path_factory.mktemp("av")
    return {
        "av": str(make_av_video(folder / "av.mp4", video_seconds=2.1)),
        "av_low": str(make_av_video(folder / "av_low.mp4", video_seconds=2.0, audio_seconds=2.0, fps=10, sampling_rate=16000)),
        "plain": str(make_video(folder / "plain.mp4", num_frames=20, fps=10, size=(32, 32), codec="mpeg4")),
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultimodalForConditionalGeneration(tiny_config(TOKENIZER, retrieval_head=True)).eval()  # retrieval at α = 0


# --- the layout: one function for processor and model ---------------------------------------------------
LAYOUT = MediaTokenLayout(
    image_grid=4, audio_max_positions=1500, audio_pool_stride=2, video_num_frames=8, video_temporal_pool_stride=2,
    video_spatial_pool_stride=2,
)
LAYOUT_CASES = [  # (name, track mel frames, (frame tokens, track tokens) per temporal step), computed by hand
    ("no_track", 0, [(4, 0)] * 4),
    ("2_s", 200, [(4, 13), (4, 12), (4, 13), (4, 12)]),  # 100 positions, pooled by 2: 50 tokens; ceil(50 i / 4)
    ("shorter_than_steps", 7, [(4, 1), (4, 0), (4, 1), (4, 0)]),  # 4 positions: 2 tokens, in windows 0 and 2
    ("capped_at_30_s", 6000, [(4, 188), (4, 187), (4, 188), (4, 187)]),  # 1500 positions at most: 750 tokens
]


@pytest.mark.parametrize("name, mel_frames, steps", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_video_token_steps_by_hand(name, mel_frames, steps):
    assert LAYOUT.video_token_steps(mel_frames) == steps
    assert LAYOUT.video_tokens(mel_frames) == sum(f + a for f, a in steps)
    assert sum(a for _, a in steps) == (LAYOUT.audio_tokens(mel_frames) if mel_frames else 0)


def test_processor_expands_one_placeholder_to_frames_and_track(clips):
    out = PROCESSOR(text=["<video> what happens"], videos=[clips["av"]], use_audio_in_video=True)
    # tiny layout: 4 frames, temporal stride 2 -> 2 steps of 2x2 frame tokens; 2.1 s -> 210 mel frames -> 105
    # encoder positions -> pooled by 2: 53 track tokens, 27 in the first window and 26 in the second
    assert out["video_audio_features"].shape == (1, 80, 210) and out["video_audio_features_mask"].sum() == 210
    assert PROCESSOR.layout.video_token_steps(210) == [(4, 27), (4, 26)]
    assert int((out["input_ids"] == VIDEO_ID).sum()) == 4 + 27 + 4 + 26
    plain = PROCESSOR(text=["<video> what happens"], videos=[clips["av"]])
    assert "video_audio_features" not in plain and int((plain["input_ids"] == VIDEO_ID).sum()) == 8


def test_each_video_file_is_opened_once_for_frames_and_track(clips, monkeypatch):
    """use_audio_in_video demuxes each file once (frames, then its sound track from the same container), and gives
    the features a separate read of the frames and of the track gives."""
    import av

    import modeling_multimodal.processing.video_processing_multimodal as video_module

    opened, real_open = [], av.open
    monkeypatch.setattr(video_module.av, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    out = PROCESSOR(text=["<video>", "<video> and <video>"], videos=[clips["av"], clips["av_low"], clips["plain"]],
                    use_audio_in_video=[True, True, False], return_metadata=True)  # fmt: skip
    assert len(opened) == 3  # one container per video file, the two tracks included
    monkeypatch.setattr(video_module.av, "open", real_open)
    frames_only = PROCESSOR(text=["<video>", "<video> and <video>"], videos=[clips["av"], clips["av_low"], clips["plain"]])
    torch.testing.assert_close(out["pixel_values_videos"], frames_only["pixel_values_videos"], rtol=0, atol=0)
    extractor = PROCESSOR.feature_extractor
    for index, path in enumerate([clips["av"], clips["av_low"]]):
        samples, _ = load_video_track(path, path, extractor.sampling_rate, out["video_metadata"][index].duration)
        expected = log_mel(extractor, samples)
        frames = int(out["video_audio_features_mask"][index].sum())
        assert frames == expected.shape[-1]
        torch.testing.assert_close(out["video_audio_features"][index, :, :frames], expected, rtol=0, atol=0)
    assert out["video_audio_features_mask"][2].sum() == 0  # the third video asked for no track


def test_track_is_decoded_at_16_khz_mono(clips):
    """The track of a 16 kHz file decodes to the sine that was written (AAC is lossy: compared loosely)."""
    samples, seconds = load_video_track(clips["av_low"], "av_low", 16000, 2.0)
    assert samples.dtype == np.float32 and samples.shape == (32000,) and seconds == pytest.approx(2.0, abs=0.1)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)
    middle = slice(2000, 30000)  # away from the codec's priming and tail
    assert np.corrcoef(samples[middle], expected[middle])[0, 1] > 0.95


def test_model_interleaves_each_steps_frames_with_its_window(clips, model):
    out = PROCESSOR(text=["<video>"], videos=[clips["av"]], use_audio_in_video=True)
    inner = model.model
    with torch.no_grad():
        merged = inner.get_video_features(out["pixel_values_videos"], out["video_audio_features"], out["video_audio_features_mask"])
        frames = inner.encode_videos(out["pixel_values_videos"])[0]  # (8, d): 2 steps of 4
        (track,), _, _ = inner.encode_audio(out["video_audio_features"], out["video_audio_features_mask"])  # (53, d)
    expected = torch.cat([frames[:4], track[:27], frames[4:], track[27:]])
    (features,) = merged.pooler_output
    torch.testing.assert_close(features, expected)
    assert features.shape[0] == int((out["input_ids"] == VIDEO_ID).sum())


# --- a track shorter or longer than the frames ------------------------------------------------------------
LENGTH_CASES = [  # (name, track seconds, warned); the frames last 2 s, one window is 1 s
    ("same", 2.0, False),
    ("a_little_short", 1.6, False),
    ("shorter", 0.7, True),
    ("longer", 3.5, True),
]


@pytest.mark.parametrize("name, audio_seconds, warned", LENGTH_CASES, ids=[c[0] for c in LENGTH_CASES])
def test_track_is_fitted_to_the_frames(tmp_path, caplog, name, audio_seconds, warned):
    path = str(make_av_video(tmp_path / f"{name}.mp4", video_seconds=2.0, audio_seconds=audio_seconds, sampling_rate=16000))
    samples, seconds = load_video_track(path, name, 16000, 2.0)
    assert samples.shape == (32000,)  # exactly the frames' span
    if audio_seconds < 2.0:
        assert seconds == pytest.approx(audio_seconds, abs=0.07)
        tail = int(16000 * (audio_seconds + 0.07))
        assert not samples[tail:].any()  # padded with silence
    else:
        assert seconds > 2.0  # decoding stopped just past the frames' end
    with caplog.at_level(logging.WARNING):
        out = PROCESSOR(text="<video>", videos=[path], use_audio_in_video=True)
    assert out["video_audio_features_mask"].sum() == 200  # the layout follows the frames, whatever the track
    assert int((out["input_ids"] == VIDEO_ID).sum()) == PROCESSOR.layout.video_tokens(200)
    assert ("the track is" in caplog.text) == warned
    if warned:
        how = "padded with silence to" if audio_seconds < 2.0 else "cut to"
        assert f"{name}.mp4'): its sound track lasts" in caplog.text and how in caplog.text


# --- bad input ------------------------------------------------------------------------------------------------
def _no_audio(tmp, clips):
    return {"text": "<video>", "videos": [clips["plain"]], "use_audio_in_video": True}


def _corrupt_audio(tmp, clips):
    return {"text": "<video>", "videos": [str(make_video_with_corrupt_audio(tmp / "corrupt.mp4"))], "use_audio_in_video": True}


def _frame_array(tmp, clips):
    return {"text": "<video>", "videos": [np.zeros((4, 32, 32, 3), np.uint8)], "use_audio_in_video": True}


def _too_long(tmp, clips):
    path = make_av_video(tmp / "long.mp4", video_seconds=31.0, fps=1, sampling_rate=8000)
    return {"text": "<video>", "videos": [str(path)], "use_audio_in_video": True}


def _wrong_flag_count(tmp, clips):
    return {"text": "<video>", "videos": [clips["av"]], "use_audio_in_video": [True, False]}


BAD_INPUTS = [
    ("no_audio_stream", _no_audio, r"sample 0, video 0 \(file '.*plain\.mp4'\): file '.*plain\.mp4' has no audio stream"),
    ("corrupt_audio_stream", _corrupt_audio, r"sample 0, video 0 \(file '.*corrupt\.mp4'\): cannot decode the audio stream"),
    ("frame_array", _frame_array, r"sample 0, video 0 \(.*\): use_audio_in_video reads the sound track of a video file"),
    ("longer_than_the_encoder", _too_long, r"long\.mp4'\): its frames last 31\.00 s; .* must fit the audio encoder's 30\.00 s"),
    ("wrong_flag_count", _wrong_flag_count, r"one bool per video \(1 in placeholder order\)"),
]


@pytest.mark.parametrize("name, build, pattern", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_naming_the_file(tmp_path, clips, name, build, pattern):
    with pytest.raises(ValueError, match=pattern):
        PROCESSOR(**build(tmp_path, clips))


def test_model_refuses_tracks_it_cannot_place(clips, model):
    out = PROCESSOR(text="<video>", videos=[clips["av"]], use_audio_in_video=True)
    tracks = {"video_audio_features": out["video_audio_features"], "video_audio_features_mask": out["video_audio_features_mask"]}
    with pytest.raises(ValueError, match="without pixel_values_videos"):
        model.model.merge_media(input_ids=out["input_ids"][:, :3], **tracks)
    two_videos = out["pixel_values_videos"].repeat(2, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="video_audio_features has 1 rows but there are 2 videos"):
        model.get_video_features(two_videos, **tracks)
    torch.manual_seed(0)
    no_audio = MultimodalForConditionalGeneration(tiny_config(TOKENIZER, audio=False)).eval()
    with pytest.raises(ValueError, match="video_audio_features was given but this model has no tower for it"):
        no_audio(**out)


# --- batching, packing, generation, retrieval ---------------------------------------------------------------
SAMPLES = [  # (text, videos, use_audio_in_video per video)
    ("<video> what happens", ["av"], [True]),
    ("<video> what", ["plain"], [False]),
    ("<video> <video> what happens in the video", ["av", "av"], [False, True]),
]


def _process(samples, clips, **kwargs):
    texts = [text for text, _, _ in samples]
    videos = [[clips[name] for name in names] for _, names, _ in samples]
    flags = [flag for _, _, sample_flags in samples for flag in sample_flags]
    return PROCESSOR(text=texts, videos=videos, use_audio_in_video=flags, **kwargs)


def test_mixed_batch_equals_each_sample_alone(clips, model):
    batch = _process(SAMPLES, clips, padding_side="left")
    assert batch["video_audio_features_mask"].sum(-1).tolist() == [210, 0, 0, 210]
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        generated = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for index, sample in enumerate(SAMPLES):
            alone = _process([sample], clips)
            torch.testing.assert_close(together[index], model(**alone).logits[0, -1], atol=1e-5, rtol=1e-4)
            one = model.generate(**alone, max_new_tokens=3, min_new_tokens=3, do_sample=False)[:, alone["input_ids"].shape[1] :]
            assert generated[index].tolist() == one[0].tolist(), f"sample {index}"


def _example(sample, clips):
    """One encoded example (as `ExampleEncoder` gives it) of a sample: labels on its text tokens."""
    out = _process([sample], clips)
    ids = out["input_ids"][0]
    example = {"input_ids": ids, "labels": torch.where(ids == VIDEO_ID, -100, ids), "pixel_values_videos": out["pixel_values_videos"]}
    if "video_audio_features" in out:
        example.update(video_audio_features=out["video_audio_features"], video_audio_features_mask=out["video_audio_features_mask"])
    return example


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_collated_and_packed_tracks_land_at_their_videos(clips, model, packed):
    """Audio-visual and plain videos mixed in one batch (a plain-only example carries no track rows): every
    sample's merged input equals its own, alone."""
    examples = [_example(sample, clips) for sample in SAMPLES]
    collate = PackingCollator(TOKENIZER.pad_token_id, max_length=256) if packed else MultimodalCollator(TOKENIZER.pad_token_id)
    batch = collate(examples)
    assert batch["video_audio_features_mask"].sum(-1).tolist() == [210, 0, 0, 210]
    media = {key: batch[key] for key in ("pixel_values_videos", "video_audio_features", "video_audio_features_mask")}
    with torch.no_grad():
        merged = model.model.merge_media(input_ids=batch["input_ids"], **media).inputs_embeds
        for index, example in enumerate(examples):
            alone = {key: value for key, value in example.items() if key not in ("input_ids", "labels")}
            expected = model.model.merge_media(input_ids=example["input_ids"][None], **alone).inputs_embeds[0]
            if packed:
                got = merged[batch["segment_ids"] == index]
            else:
                got = merged[index, : len(example["input_ids"])]
            torch.testing.assert_close(got, expected)
    if packed:
        assert model(**{**batch, "use_cache": False}).loss is not None  # the packed batch trains


def test_generation_encodes_frames_and_track_once(clips, model):
    batch = _process(SAMPLES[:1], clips)
    calls = {"vision": 0, "audio": 0}
    hooks = [
        model.model.vision_tower.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
        model.model.audio_tower.conv1.register_forward_hook(lambda *a: calls.__setitem__("audio", calls["audio"] + 1)),
    ]
    try:
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"vision": 1, "audio": 1}


def test_retrieval_embeddings_read_the_track(clips, model):
    batch = PROCESSOR(text="<video> <video>", videos=[clips["av"], clips["av"]], use_audio_in_video=[True, False])
    videos, tracks = batch["pixel_values_videos"], batch["video_audio_features"]
    mask = batch["video_audio_features_mask"]
    with torch.no_grad():
        embeddings = model.get_retrieval_embeddings(pixel_values_videos=videos, video_audio_features=tracks, video_audio_features_mask=mask)
        frames_only = model.get_retrieval_embeddings(pixel_values_videos=videos)
        alone = model.get_retrieval_embeddings(pixel_values_videos=videos[:1], video_audio_features=tracks[:1], video_audio_features_mask=mask[:1])
        features = model.get_video_features(videos, tracks, mask).pooler_output
    assert embeddings.shape == (2, model.config.contrastive_dim or 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(embeddings[0], alone[0], atol=1e-5, rtol=1e-4)  # batch-invariant
    torch.testing.assert_close(embeddings[1], frames_only[1], atol=1e-5, rtol=1e-4)  # no track: the frames alone
    assert not torch.allclose(embeddings[0], frames_only[0], atol=1e-3)  # the track changes the embedding
    assert [f.shape[0] for f in features] == [61, 8]
    with pytest.raises(ValueError, match="pass them with pixel_values_videos"):
        model.get_retrieval_embeddings(input_features=tracks, video_audio_features=tracks)


# --- chat template ------------------------------------------------------------------------------------------
def test_chat_template_takes_use_audio_in_video_per_item_or_per_call(clips):
    def messages(flag=None):
        video = {"type": "video", "video": clips["av"]} | ({} if flag is None else {"use_audio_in_video": flag})
        return [{"role": "user", "content": [video, {"type": "video", "video": clips["av"]}, {"type": "text", "text": "what happens"}]}]

    def tracks(conversation, **kwargs):
        out = PROCESSOR.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)
        counted = int((out["input_ids"] == VIDEO_ID).sum())
        return (out["video_audio_features_mask"].sum(-1).tolist() if "video_audio_features" in out else None), counted

    assert tracks(messages()) == (None, 16)
    assert tracks(messages(True)) == ([210, 0], 61 + 8)
    assert tracks(messages(), use_audio_in_video=True) == ([210, 210], 61 + 61)
    assert tracks(messages(False), use_audio_in_video=True) == ([0, 210], 8 + 61)  # the item's own value wins
    assert PROCESSOR.apply_chat_template(messages(True), add_generation_prompt=True) == "user: <video> <video> what happens</s>\nassistant:"


# --- speech ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_spoken_word_muxed_into_a_video_is_the_track_read_back(tmp_path):
    """espeak-ng speech muxed losslessly (PCM in Matroska) comes back sample for sample as the track's log-mel."""
    from modeling_multimodal.demo_data.speech import find_espeak, synthesize

    wav = tmp_path / "word.wav"
    synthesize("circle", "en-us", 160, wav, find_espeak())
    speech, rate = soundfile.read(wav, dtype="float32")
    seconds = np.ceil(len(speech) / rate * 10) / 10 + 0.1  # frames at 10 fps that outlast the word
    path = str(make_av_video(tmp_path / "word.mkv", seconds, audio=speech, sampling_rate=rate, audio_codec="pcm_s16le", container_format="matroska"))
    out = PROCESSOR(text="<video>", videos=[path], use_audio_in_video=True)
    expected = load_audio(str(wav), None, 16000)
    expected = np.pad(expected, (0, round(seconds * 16000) - len(expected)))
    frames = int(out["video_audio_features_mask"].sum())
    torch.testing.assert_close(out["video_audio_features"][0, :, :frames], log_mel(PROCESSOR.feature_extractor, expected), atol=1e-4, rtol=0)


# --- training data: task templates, chat rows, exact length estimates -----------------------------------------
def test_example_encoder_carries_the_track_and_estimates_its_length(clips):
    spec = TaskSpec("av_caption", "<video> what happens?", "caption", {"video": "video"}, use_audio_in_video=True)
    chat_row = {"id": "chat", "messages": [
        {"role": "user", "content": [{"type": "video", "video": clips["plain"]}, {"type": "video", "video": clips["av"], "use_audio_in_video": True}]},
        {"role": "assistant", "content": "a red circle"},
    ]}  # fmt: skip
    for row, task, tracks in (({"id": "0", "video": clips["av"], "caption": "a red circle"}, spec, [210]), (chat_row, None, [0, 210])):
        encoder = ExampleEncoder(PROCESSOR, task)
        encoded = encoder(row)
        assert encoded["video_audio_features_mask"].sum(-1).tolist() == tracks
        assert len(encoded["input_ids"]) == encoder.estimate_length(row)  # exact, from the packets alone


# --- the demo task's data ---------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_av_demo_data_needs_both_streams_and_holds_out_combinations(tmp_path):
    from modeling_multimodal.demo_data import grammar
    from modeling_multimodal.demo_data.av_videos import SHAPE_GREY, make_av_demo_data, manifest_path

    meta = make_av_demo_data(tmp_path, sizes={"train": 6, "validation": 2, "test": 4})
    splits = {split: list(load_manifest(manifest_path(tmp_path, split), root=tmp_path)) for split in grammar.SPLITS}
    held_out = {tuple(c) for c in meta["held_out_combinations"]}
    for split, rows in splits.items():
        assert len(rows) == meta["sizes"][split]
        for row in rows:
            a = row["attributes"]
            assert row["caption"] == f"a {a['colour']} {a['shape']} moving {a['direction']}"
            assert ((a["colour"], a["shape"], a["direction"]) in held_out) == (split == "test")
    row = splits["train"][0]
    encoder = ExampleEncoder(PROCESSOR, "av_video_caption")
    encoded = encoder(row)
    assert len(encoded["input_ids"]) == encoder.estimate_length(row)
    track = encoded["video_audio_features"][0, :, : int(encoded["video_audio_features_mask"].sum())]
    assert track.std() > 0.1  # a spoken word, not silence
    frames, _ = load_video(row["video"], 12)
    saturation = frames.max(-1).astype(int) - frames.min(-1).astype(int)
    assert saturation.max() < 40 and (np.abs(frames.astype(int) - SHAPE_GREY[0]) < 20).any()  # grey: no colour shown


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_measurement_script_runs_every_arm(tmp_path):
    """scripts/measure_audio_in_video.py end to end at a tiny budget (the measured numbers: docs/RESULTS.md)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "measure_audio_in_video.py"
    spec = importlib.util.spec_from_file_location("measure_audio_in_video", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stages = "stages=[{stage: encoders, optim.max_steps: 2}, {stage: full, optim.max_steps: 2}]"
    results = module.main(["--out", str(tmp_path), "--train", "8", stages, "data.eval=[]"])
    for arm in ("both", "frames", "audio"):
        scores = results["arms"][arm]["scores"]
        assert 0.0 <= scores["exact_match"] <= 1.0 and set(scores) >= {"colour_accuracy", "shape_accuracy", "direction_accuracy"}
