"""Audio: input forms, mono mixing, resampling, file formats, per-clip log-mels, masks, the 30 s limit."""

import io
import logging

import numpy as np
import pytest
import soundfile
import torch
from media_builders import tiny_processor, tone
from transformers import WhisperFeatureExtractor

from modeling_multimodal.processing.audio_loading import load_audio, log_mel


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _wav_bytes(samples, rate) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


FORMS = [  # every form of the same 22.05 kHz stereo clip
    ("array_with_sampling_rate", lambda clip, tmp: clip),
    ("channels_first_array", lambda clip, tmp: np.ascontiguousarray(clip.T)),
    ("torch_tensor", lambda clip, tmp: torch.from_numpy(clip.T.copy())),
    ("datasets_dict", lambda clip, tmp: {"array": clip, "sampling_rate": 22050}),
    ("wav_path", lambda clip, tmp: (tmp / "clip.wav").write_bytes(_wav_bytes(clip, 22050)) and str(tmp / "clip.wav")),
    ("wav_bytes", lambda clip, tmp: _wav_bytes(clip, 22050)),
]


@pytest.mark.parametrize("name, convert", FORMS, ids=[f[0] for f in FORMS])
def test_every_input_form_gives_the_array_result(processor, name, convert, tmp_path):
    clip = tone(0.8, 22050, channels=2)  # (samples, 2)
    expected = processor("<audio>", audio=clip, sampling_rate=22050)
    result = processor("<audio>", audio=convert(clip, tmp_path), sampling_rate=22050)
    for key in ("input_ids", "input_features", "input_features_mask"):
        assert torch.equal(result[key], expected[key]), key


def test_stereo_is_mixed_to_mono_and_resampled():
    stereo = tone(1.0, 44100, channels=2)
    mono = load_audio(stereo, 44100, 16000)
    assert mono.shape == (16000,)
    expected = load_audio(stereo.mean(axis=1), 44100, 16000)
    np.testing.assert_allclose(mono, expected, atol=1e-6)
    # a resampled 440 Hz sine is still that sine (away from the edges)
    reference = 0.375 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)  # mean of the 0.25 and 0.5 channels
    np.testing.assert_allclose(mono[400:-400], reference[400:-400], atol=2e-3)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampled_length_is_exact(rate):
    assert load_audio(tone(1.5, rate), rate, 16000).shape == (24000,)


@pytest.mark.parametrize("fmt, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_files_decode(tmp_path, fmt, subtype):
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, tone(1.0, 22050, channels=2), 22050, format=fmt, subtype=subtype)
    samples = load_audio(str(path), None, 16000)
    assert abs(len(samples) - 16000) < 1200 and 0.3 < np.abs(samples).max() < 0.5


def test_container_formats_fall_back_to_pyav(tmp_path):
    import av

    path = tmp_path / "clip.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        samples = tone(1.0)[None, :]
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert abs(len(load_audio(str(path), None, 16000)) - 16000) < 2100  # AAC adds priming samples


def test_features_of_a_clip_do_not_depend_on_the_batch(processor):
    short, long = tone(0.5), tone(2.0, frequency=300)
    alone = processor("<audio>", audio=short, sampling_rate=16000)
    batched = processor(["<audio>", "<audio>"], audio=[short, long], sampling_rate=16000)
    frames = int(alone["input_features_mask"].sum())
    assert frames == 50 and batched["input_features"].shape == (2, 80, 200)
    assert torch.equal(batched["input_features"][0, :, :frames], alone["input_features"][0])
    assert batched["input_features"][0, :, frames:].abs().sum() == 0  # zero padding
    assert batched["input_features_mask"].tolist()[0] == [1] * 50 + [0] * 150
    assert batched["input_features_mask"].dtype == torch.long


def test_log_mel_equals_whisper_on_the_unpadded_clip():
    extractor = WhisperFeatureExtractor()
    clip = tone(1.3)
    ours = log_mel(extractor, clip)
    assert ours.shape == (80, len(clip) // 160)
    reference = extractor._np_extract_fbank_features(clip[None].astype(np.float64), "cpu")[0]
    torch.testing.assert_close(ours, torch.from_numpy(reference).float(), atol=2e-4, rtol=0)


def test_too_long_audio_raises_or_truncates(processor, caplog):
    clip = tone(31.0)
    with pytest.raises(ValueError, match=r"sample 0, audio 0 .* lasts 31.00 s \(3100 mel frames\).*3000 frames"):
        processor("<audio>", audio=clip, sampling_rate=16000)
    with caplog.at_level(logging.WARNING):
        out = processor("<audio>", audio=clip, sampling_rate=16000, truncate_audio=True)
    assert out["input_features"].shape == (1, 80, 3000)
    assert int((out["input_ids"] == processor.media_token_ids["audio"]).sum()) == processor.layout.audio_tokens(3000)
