"""Hostile and careless inputs: each is refused with one clear error naming the item, or handled as documented.

The table rows are (name, build the processor call's arguments from a tmp dir, error pattern). Every row runs
under a timeout: a FIFO or device that blocked or never ended would fail the test rather than hang the suite.
Behaviours that are not errors (EXIF orientation, 16-bit images, empty text) have their own tests below.
docs/RELIABILITY.md lists every case with the test that checks it.
"""

from __future__ import annotations

import os
import re

import av
import numpy as np
import PIL.Image
import pytest
import soundfile
import torch
from media_builders import make_video, random_image, tiny_processor, tone

from modeling_multimodal.processing.image_processing_multimodal import load_image
from modeling_multimodal.processing.video_processing_multimodal import load_video


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _fifo(tmp, name):
    path = tmp / name
    os.mkfifo(path)  # nobody ever writes: opening it for reading blocks unless the reader refuses it
    return str(path)


def _folder(tmp, name):
    path = tmp / name
    path.mkdir()
    return str(path)


def _long_wav(tmp, seconds=40.0, rate=8000):
    path = tmp / "long.wav"
    soundfile.write(path, tone(seconds, rate), rate)
    return str(path)


def _wav(tmp, name, samples, rate):
    path = tmp / name
    soundfile.write(path, samples, rate)
    return str(path)


def _long_m4a(tmp, seconds=40.0, rate=8000):
    """An AAC clip in MP4 (libsndfile cannot read it: the PyAV path, duration from the container)."""
    path = tmp / "long.m4a"
    samples = tone(seconds, rate)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def faststart_mp4(path, num_frames=24, size=(48, 64)):
    """An mp4 with its index (moov) before the data, as streamed files are, so a cut file still opens."""
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        stream.codec_context.gop_size = 4
        for k in range(num_frames):
            frame = np.full((*size, 3), 8 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _truncated_mp4(tmp):
    data = faststart_mp4(tmp / "whole.mp4").read_bytes()
    path = tmp / "cut.mp4"
    path.write_bytes(data[: int(len(data) * 0.7)])  # a download that stopped early
    return str(path)


def _nan_image(kind):
    image = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    image[2, 3, 1] = np.nan if kind == "nan" else np.inf
    return image


CASES = [  # (name, build the call's arguments from a tmp dir, error pattern)
    ("image_fifo", lambda t: dict(text="<image>", images=_fifo(t, "pipe.png")), r"sample 0, image 0 \(file '.*pipe.png'\): .*is a FIFO \(named pipe\), not a regular file"),
    ("image_directory", lambda t: dict(text="<image>", images=_folder(t, "photos")), r"sample 0, image 0 \(file '.*photos'\): .*is a directory"),
    ("image_device", lambda t: dict(text="<image>", images="/dev/zero"), r"file '/dev/zero'.* is a character device, not a regular file"),
    ("audio_fifo", lambda t: dict(text="<audio>", audio=_fifo(t, "pipe.wav")), r"sample 0, audio 0 \(file '.*pipe.wav'\): .*is a FIFO"),
    ("audio_device", lambda t: dict(text="<audio>", audio="/dev/zero"), r"sample 0, audio 0 .* is a character device"),
    ("audio_directory", lambda t: dict(text="<audio>", audio=_folder(t, "clips")), r"file '.*clips'.* is a directory"),
    ("video_fifo", lambda t: dict(text=["hi", "<video>"], videos=_fifo(t, "pipe.mp4")), r"sample 1, video 0 \(file '.*pipe.mp4'\): .*is a FIFO"),
    ("video_device", lambda t: dict(text="<video>", videos="/dev/urandom"), r"file '/dev/urandom'.* is a character device"),
    ("video_directory", lambda t: dict(text="<video>", videos=_folder(t, "films")), r"file '.*films'.* is a directory"),
    ("missing_audio_file", lambda t: dict(text="<audio>", audio=str(t / "nope.wav")), r"sample 0, audio 0 \(file '.*nope.wav'\): .*does not exist"),
    ("missing_video_file", lambda t: dict(text="<video>", videos=str(t / "nope.mp4")), r"sample 0, video 0 \(file '.*nope.mp4'\): .*does not exist"),
    ("wav_too_long_from_header", lambda t: dict(text="<audio>", audio=_long_wav(t)), r"sample 0, audio 0 .*long.wav' lasts 40.00 s \(from its header\), more than the 30.01 s"),
    ("m4a_too_long_from_container", lambda t: dict(text="<audio>", audio=_long_m4a(t)), r"sample 0, audio 0 .*long.m4a' lasts 40.\d\d s \(from its header\)"),
    ("wav_with_33_channels", lambda t: dict(text="<audio>", audio=_wav(t, "wide.wav", np.zeros((160, 33), np.float32), 16000)), r"sample 0, audio 0 .*wide.wav' declares 33 channels; expected 1..32"),
    ("wav_with_500_hz_rate", lambda t: dict(text="<audio>", audio=_wav(t, "slow.wav", tone(0.5, 500), 500)), r"file '.*slow.wav': sampling_rate=500 cannot be resampled"),
    ("video_frames_over_pixel_limit", lambda t: dict(text="<video>", videos=str(make_video(t / "v.mp4", num_frames=4)), videos_kwargs={"max_image_pixels": 1000}), r"sample 0, video 0 .*each frame of file '.*v.mp4' is 64x48 = 3072 pixels, above max_image_pixels=1000"),
    ("frame_array_over_pixel_limit", lambda t: dict(text="<video>", videos=np.zeros((4, 40, 40, 3), np.uint8), videos_kwargs={"max_image_pixels": 1000}), r"sample 0, video 0 .* 40x40 = 1600 pixels, above max_image_pixels=1000"),
    ("truncated_video", lambda t: dict(text="<video>", videos=_truncated_mp4(t)), r"sample 0, video 0 .*cut.mp4' is truncated or damaged: its header lists 24 video frames but only \d+ are in the file"),  # the cut point depends on the encoder's thread count
    ("nan_image_array", lambda t: dict(text=["hi", "<image>"], images=_nan_image("nan")), r"sample 1, image 0 \(ndarray\(8, 8, 3\)\): the image contains NaN or infinite values"),
    ("inf_image_tensor", lambda t: dict(text="<image>", images=torch.from_numpy(_nan_image("inf")).permute(2, 0, 1)), r"sample 0, image 0 \(Tensor\(3, 8, 8\)\): the image contains NaN or infinite"),
    ("nan_video_frames", lambda t: dict(text="<video>", videos=np.stack([_nan_image("nan")] * 4)), r"sample 0, video 0 .*NaN or infinite"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, make_arguments, pattern", CASES, ids=[case[0] for case in CASES])
def test_bad_media_raise_clear_errors(processor, tmp_path, name, make_arguments, pattern):
    with pytest.raises(ValueError, match=pattern):
        processor(**make_arguments(tmp_path))


def test_permission_denied_is_a_clear_error(processor, tmp_path, monkeypatch):
    """(Simulated: the suite may run as root, which reads any file.)"""
    path = tmp_path / "secret.png"
    PIL.Image.fromarray(random_image(8, 8)).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ValueError, match=r"sample 0, image 0 \(file '.*secret.png'\): .* cannot be read: permission denied"):
        processor("<image>", images=str(path))


def _count_decoded_samples(monkeypatch) -> list[int]:
    """Record the samples libsndfile reads and PyAV decodes (per call / frame) while audio files load."""
    from modeling_multimodal.processing import audio_loading

    decoded, read, av_open = [], soundfile.SoundFile.read, av.open

    def counting_read(self, *args, **kwargs):
        samples = read(self, *args, **kwargs)
        decoded.append(len(samples))
        return samples

    class CountingContainer:  # PyAV's classes are compiled: wrap the container instead of patching it
        def __init__(self, container):
            self.container = container

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, stream):
            for frame in self.container.decode(stream):
                decoded.append(frame.samples)
                yield frame

    monkeypatch.setattr(soundfile.SoundFile, "read", counting_read)
    monkeypatch.setattr(audio_loading.av, "open", lambda *args, **kwargs: CountingContainer(av_open(*args, **kwargs)))
    return decoded


@pytest.mark.parametrize("make_file", [_long_wav, _long_m4a], ids=["wav", "m4a"])
def test_long_audio_is_refused_or_truncated_without_decoding_it_all(processor, tmp_path, monkeypatch, caplog, make_file):
    path = make_file(tmp_path)  # 40 s at 8 kHz
    decoded = _count_decoded_samples(monkeypatch)
    with pytest.raises(ValueError, match="from its header"):
        processor("<audio>", audio=path)
    assert sum(decoded) == 0  # refused before a sample was decoded
    # truncate_audio=True: only the first 30 s are decoded (plus at most one codec frame), with a warning
    with caplog.at_level("WARNING"):
        out = processor("<audio>", audio=path, truncate_audio=True)
    assert out["input_features"].shape[-1] == processor.layout.max_audio_mel_frames()
    assert 30 * 8000 <= sum(decoded) <= 30 * 8000 + 2048
    assert re.search(r"long\.(wav|m4a)' lasts 40.\d\d s; only its first 30.00 s were decoded", caplog.text)


def test_truncated_file_matches_the_truncated_array(processor, tmp_path):
    """Truncating while decoding gives the features of the clip's first 30 s, as truncating the array does."""
    path = _wav(tmp_path, "long16k.wav", tone(31.0, 16000), 16000)
    samples = soundfile.read(path, dtype="float32")[0]  # as stored (16-bit PCM)
    from_file = processor("<audio>", audio=path, truncate_audio=True)
    from_array = processor("<audio>", audio=samples, sampling_rate=16000, truncate_audio=True)
    assert torch.equal(from_file["input_features"], from_array["input_features"])


def test_short_audio_file_is_unchanged_by_the_limit(processor, tmp_path):
    path = tmp_path / "short.wav"
    soundfile.write(path, tone(0.5), 16000)
    from_file = processor("<audio>", audio=str(path))
    from_array = processor("<audio>", audio=soundfile.read(path, dtype="float32")[0], sampling_rate=16000)
    assert torch.equal(from_file["input_features"], from_array["input_features"])


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    from transformers.image_utils import load_image as transformers_load_image

    pixels = random_image(16, 32)  # landscape, so a rotation shows in the shape
    for orientation in (3, 6, 8):  # 180°, 90° clockwise, 90° counter-clockwise
        exif = PIL.Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"photo-{orientation}.png"  # PNG: lossless, so the comparison is exact
        PIL.Image.fromarray(pixels).save(path, exif=exif)
        ours = load_image(str(path))
        np.testing.assert_array_equal(ours, np.asarray(transformers_load_image(str(path))))
        assert ours.shape == ((16, 32, 3) if orientation == 3 else (32, 16, 3))
        np.testing.assert_array_equal(load_image(path.read_bytes()), ours)  # bytes and PIL agree with the path
        with PIL.Image.open(path) as image:
            np.testing.assert_array_equal(load_image(image), ours)
    np.testing.assert_array_equal(load_image(str(tmp_path / "photo-3.png")), pixels[::-1, ::-1])


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, mode):
    levels = np.array([[0, 257, 32896], [65535, 1000, 65278]], dtype=np.uint16)  # 0, 1, 128, 255, ~3.9, 254 (x257)
    image = PIL.Image.fromarray(levels) if mode == "I;16" else PIL.Image.fromarray(levels.astype(np.int32), mode="I")
    assert image.mode == mode
    path = tmp_path / ("depth.png" if mode == "I;16" else "depth.tif")  # Pillow writes mode I as TIFF, not PNG
    image.save(path)
    expected = np.repeat(np.round(levels / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(load_image(image), expected)
    np.testing.assert_array_equal(load_image(str(path)), expected)
    assert expected[1, 0, 0] == 255  # clipping would have kept only values <= 255 (255 -> 255, 32896 -> 255)


def test_empty_text_gives_integer_ids(processor):
    for text in ("", [""], ["", "hello"]):
        out = processor(text=text)
        assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    assert processor(text="", return_tensors="np")["input_ids"].dtype == np.int64


def test_corrupt_packets_warn_and_stand_in(tmp_path, caplog):
    """A sampled frame whose packet is damaged is replaced by the next decodable frame, with a warning."""
    data = bytearray(faststart_mp4(tmp_path / "ok.mp4", num_frames=8).read_bytes())
    with av.open(str(tmp_path / "ok.mp4")) as container:
        packets = [(p.pos, p.size, p.pts) for p in container.demux(container.streams.video[0]) if p.size]
    position, size, _ = sorted(packets, key=lambda p: p[2])[5]  # frame 5 (not a keyframe: gop 4)
    data[position : position + size] = bytes(size)
    (tmp_path / "damaged.mp4").write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        frames, metadata = load_video(str(tmp_path / "damaged.mp4"), num_frames=8)
    assert frames.shape[0] == 8
    assert "did not decode" in caplog.text and "damaged.mp4" in caplog.text


# --- manifests -------------------------------------------------------------------------------------
def _manifest(tmp, text, name="data.jsonl"):
    (tmp / "root").mkdir(exist_ok=True)
    path = tmp / "root" / name
    path.write_text(text)
    return path


def _rows(*rows):
    import json

    return "".join(json.dumps(row) + "\n" for row in rows)


def _link_out(tmp, is_dir=False):
    """root/leak(.png) -> a file (or folder) outside the root."""
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"not yours")
    (tmp / "root").mkdir(exist_ok=True)
    link = tmp / "root" / ("leak" if is_dir else "leak.png")
    link.symlink_to(outside if is_dir else outside / "secret.png")
    return "leak/secret.png" if is_dir else "leak.png"


GOOD = {"image": "a.png", "caption": "a red square"}
MANIFEST_CASES = [  # (name, write the manifest under tmp/root and return (path, task), error pattern)
    ("symlink_file_leaving_root", lambda t: (_manifest(t, _rows({**GOOD, "image": _link_out(t)})), "image_caption"), r"Row '0': media path 'leak.png' \(a symlink to '.*outside/secret.png'\) leaves the data root"),
    ("symlink_folder_leaving_root", lambda t: (_manifest(t, _rows(GOOD, {**GOOD, "image": _link_out(t, True)})), "image_caption"), r"Row '1': media path 'leak/secret.png' \(a symlink .* leaves the data root"),
    ("dotdot_leaving_root", lambda t: (_manifest(t, _rows({**GOOD, "image": "../x.png"})), "image_caption"), r"Row '0': media path '../x.png' leaves the data root"),
    ("nul_in_media_path", lambda t: (_manifest(t, _rows({**GOOD, "image": "a\u0000.png"})), "image_caption"), r"Row '0': media path 'a\\x00.png' contains a NUL character"),
    ("malformed_jsonl_line", lambda t: (_manifest(t, _rows(GOOD) + '{"image": "b.png", "caption": \n' + _rows(GOOD)), "image_caption"), r"Manifest '.*data.jsonl', line 2: not valid JSON"),
    ("jsonl_line_not_an_object", lambda t: (_manifest(t, _rows(GOOD) + "\n[1, 2]\n"), "image_caption"), r"Manifest '.*data.jsonl', line 3: expected a JSON object \(one row\), got list"),
    ("empty_manifest", lambda t: (_manifest(t, ""), "image_caption"), r"Manifest '.*data.jsonl' is empty: it has no rows"),
    ("blank_lines_only", lambda t: (_manifest(t, "\n \n"), None), r"Manifest '.*data.jsonl' has no rows"),
    ("empty_csv", lambda t: (_manifest(t, "image,caption\n", "data.csv"), "image_caption"), r"Manifest '.*data.csv' has no rows"),
    ("ragged_csv", lambda t: (_manifest(t, 'image,caption\na.png,"x\nb.png,y,z,w\n', "data.csv"), "image_caption"), r"Manifest '.*data.csv' cannot be read as csv: Error tokenizing data"),
    ("missing_manifest", lambda t: (t / "nope.jsonl", "image_caption"), r"Manifest '.*nope.jsonl' does not exist"),
    ("manifest_is_a_fifo", lambda t: (_fifo(t, "pipe.jsonl"), "image_caption"), r"Manifest '.*pipe.jsonl' does not exist \(or is not a regular file\)"),
    ("row_without_caption", lambda t: (_manifest(t, _rows(GOOD, {"image": "b.png"})), "image_caption"), r"Manifest '.*data.jsonl', row 1 \(id '1'\): no 'caption' value, which task 'image_caption' needs"),
    ("row_with_blank_transcript", lambda t: (_manifest(t, _rows({"audio": "a.wav", "transcript": "  "})), "speech_transcription"), r"row 0 \(id '0'\): no 'transcript' value"),
    ("pair_row_without_caption", lambda t: (_manifest(t, _rows({"image": "a.png", "caption": None})), "image_text_pair"), r"row 0 .*no 'caption' value, which task 'image_text_pair'"),
    ("row_without_media", lambda t: (_manifest(t, _rows(GOOD, GOOD, {"image": None, "caption": "x", "id": "r3"})), "image_caption"), r"row 2 \(id 'r3'\): no 'image' value"),
    ("column_missing_everywhere", lambda t: (_manifest(t, _rows({"image": "a.png", "text": "x"})), "image_caption"), r"Manifest '.*data.jsonl' has no column\(s\) \['caption'\]"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, make_manifest, pattern", MANIFEST_CASES, ids=[case[0] for case in MANIFEST_CASES])
def test_bad_manifests_raise_clear_errors(tmp_path, name, make_manifest, pattern):
    from modeling_multimodal.data.examples import load_manifest

    path, task = make_manifest(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        load_manifest(path, root=tmp_path / "root", task=task, cache_dir=str(tmp_path / "cache"))


def test_symlinks_inside_the_root_are_followed(tmp_path):
    """A link whose target stays in the root is fine, and so is a root that is itself a link."""
    from modeling_multimodal.data.examples import load_manifest

    real = tmp_path / "real"
    (real / "media").mkdir(parents=True)
    (real / "media" / "a.png").write_bytes(b"")
    (real / "alias.png").symlink_to(real / "media" / "a.png")
    (tmp_path / "root").symlink_to(real)
    path = _manifest(tmp_path, _rows({**GOOD, "image": "alias.png"}, GOOD))
    rows = load_manifest(path, root=tmp_path / "root", task="image_caption", cache_dir=str(tmp_path / "cache"))
    assert rows["image"] == [str(tmp_path / "root" / "alias.png"), str(tmp_path / "root" / "a.png")]


def test_build_example_refuses_a_row_without_its_response():
    from modeling_multimodal.data.examples import build_example

    with pytest.raises(ValueError, match=r"Row '7': no 'caption' value, which task 'image_caption' trains on"):
        build_example({"id": "7", "image": "a.png", "caption": ""}, "image_caption")


# --- push: nothing outside the folder --------------------------------------------------------------
def _checkpoint_folder(tmp):
    folder = tmp / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    outside = tmp / "elsewhere"
    outside.mkdir()
    (outside / "id_rsa").write_text("secret")
    return folder, outside


def test_push_refuses_symlinks_leaving_the_folder(tmp_path):
    from modeling_multimodal.hub import checkpoint_files, push_checkpoint

    folder, outside = _checkpoint_folder(tmp_path)
    (folder / "sub" / "notes.txt").symlink_to(outside / "id_rsa")
    pattern = r"holds symlinks to files outside it \(sub/notes.txt -> .*elsewhere/id_rsa\)"
    with pytest.raises(ValueError, match=pattern):
        checkpoint_files(folder)
    with pytest.raises(ValueError, match=pattern):  # refused before any request (this process is offline)
        push_checkpoint(folder, "org/model")


def test_push_keeps_links_inside_the_folder_and_skips_linked_folders(tmp_path):
    from modeling_multimodal.hub import checkpoint_files

    folder, outside = _checkpoint_folder(tmp_path)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "sub" / "tokenizer.json").symlink_to(folder / "tokenizer.json")  # stays inside: uploaded
    (folder / "linked").symlink_to(outside, target_is_directory=True)  # a folder link is not entered
    assert checkpoint_files(folder) == ["config.json", "model.safetensors", "sub/tokenizer.json", "tokenizer.json"]


@pytest.mark.timeout(60)
def test_length_estimates_never_block_on_a_fifo(tmp_path):
    """The trainer estimates every row's length from audio headers before training: a FIFO is refused there too."""
    from modeling_multimodal.data.examples import audio_mel_frames

    with pytest.raises(ValueError, match=r"audio file '.*pipe.wav' is a FIFO"):
        audio_mel_frames(_fifo(tmp_path, "pipe.wav"))
    assert audio_mel_frames(_wav(tmp_path, "one.wav", tone(1.0, 8000), 8000)) == 100  # 1 s at 100 frames/s
    assert audio_mel_frames(_long_m4a(tmp_path, seconds=2.0)) == 200  # duration from the container (PyAV path)


def test_hub_request_timeout_applies_inside_and_is_restored_after():
    import httpx2
    from huggingface_hub import get_session

    from modeling_multimodal.hub import hub_request_timeout

    before = get_session().timeout
    with hub_request_timeout(3.5):
        assert get_session().timeout == httpx2.Timeout(3.5)
    assert get_session().timeout == before
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got 0"):
        with hub_request_timeout(0):
            pass
