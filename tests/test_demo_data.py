"""Demo data: files decode, captions describe what was drawn, held-out combinations stay out of training,
and the same seed gives the same bytes. Small sizes keep the whole file to a few seconds."""

import hashlib
import json
import re

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from modeling_multimodal.demo_data import (
    HELD_OUT_PAIRS,
    SPLITS,
    TASKS,
    TEST_VOICES,
    TRAIN_VOICES,
    make_demo_data,
    manifest_path,
    read_manifest,
)
from modeling_multimodal.demo_data import grammar, speech

SMALL = {
    "image": {"train": 12, "validation": 4, "test": 8},
    "video": {"train": 4, "validation": 2, "test": 3},
    "speech": {"train": 5, "validation": 2, "test": 3},
}
COLOUR = "|".join(grammar.COLOURS)
SHAPE = "|".join(grammar.SHAPES)
SIZE = "|".join(grammar.SIZES)
IMAGE_CAPTION = re.compile(
    rf"^a ({SIZE}) ({COLOUR}) ({SHAPE}) in the (centre|(?:top|middle|bottom) (?:left|centre|right))$"
)
VIDEO_CAPTION = re.compile(rf"^a ({SIZE}) ({COLOUR}) ({SHAPE}) moving (left|right|up|down)$")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, seed=0, sizes=SMALL)
    return out


def rows(data_dir, task, split):
    return read_manifest(data_dir, task, split)


def colour_shape(text):
    """(colour, shape) named in a caption or transcript, None for either it lacks."""
    words = text.split()
    return next((w for w in words if w in grammar.COLOURS), None), next((w for w in words if w in grammar.SHAPES), None)


def test_manifests_counts_ids_and_paths(data_dir):
    ids = []
    for task in TASKS:
        media_key = {"image": "image", "video": "video", "speech": "audio"}[task]
        for split in SPLITS:
            manifest = rows(data_dir, task, split)
            assert len(manifest) == SMALL[task][split]
            for row in manifest:
                assert not row[media_key].startswith("/") and (data_dir / row[media_key]).is_file()
                ids.append(row["id"])
    assert len(ids) == len(set(ids))
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["counts"] == {task: {split: SMALL[task][split] for split in SPLITS} for task in TASKS}
    assert meta["held_out"]["rule"] == "combinations" and meta["config"]["holdout"] == "combinations"
    assert (data_dir / "README.md").is_file()


def test_images_decode_and_match_their_captions(data_dir):
    for split in SPLITS:
        for row in rows(data_dir, "image", split):
            image = Image.open(data_dir / row["image"])
            assert image.mode == "RGB" and image.size == (64, 64)
            size, colour, shape, position = IMAGE_CAPTION.match(row["caption"]).groups()
            attributes = row["attributes"]
            assert (size, colour, shape, position) == (attributes["size"], attributes["colour"], attributes["shape"], attributes["position"])
            x, y = attributes["centre"]
            assert image.getpixel((round(x), round(y))) == grammar.COLOURS[colour], row["id"]
            # The named cell is the one whose centre is nearest to the drawn shape.
            row_name = min(grammar.ROWS, key=lambda r: abs(grammar.ROWS[r] * 64 - y))
            column_name = min(grammar.COLUMNS, key=lambda c: abs(grammar.COLUMNS[c] * 64 - x))
            assert grammar.position_name(row_name, column_name) == position, row["id"]
            # A corner pixel is background grey, not the shape.
            r, g, b = image.getpixel((0, 0)) if position != "top left" else image.getpixel((63, 63))
            assert r == g == b


def test_videos_decode_and_move_as_captioned(data_dir):
    for split in SPLITS:
        for row in rows(data_dir, "video", split):
            with av.open(str(data_dir / row["video"])) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            attributes = row["attributes"]
            assert len(frames) == attributes["num_frames"] and frames[0].shape == (64, 64, 3)
            size, colour, shape, direction = VIDEO_CAPTION.match(row["caption"]).groups()
            assert (colour, shape, direction) == (attributes["colour"], attributes["shape"], attributes["direction"])
            expected = np.array(grammar.COLOURS[colour])
            for frame, (x, y) in ((frames[0], attributes["start"]), (frames[-1], attributes["end"])):
                assert np.abs(frame[round(y), round(x)].astype(int) - expected).max() < 40, row["id"]
            (x0, y0), (x1, y1) = attributes["start"], attributes["end"]
            moved = {"right": x1 - x0, "left": x0 - x1, "down": y1 - y0, "up": y0 - y1}[direction]
            assert moved > 20


def test_speech_is_16khz_mono_and_transcribed_from_the_vocabulary(data_dir):
    vocabulary = set(json.loads((data_dir / "meta.json").read_text())["vocabulary"])
    for split in SPLITS:
        for row in rows(data_dir, "speech", split):
            info = soundfile.info(data_dir / row["audio"])
            assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
            samples, _ = soundfile.read(data_dir / row["audio"], dtype="float32")
            assert 0.5 < len(samples) / 16_000 < 5 and row["duration"] == pytest.approx(len(samples) / 16_000, abs=1e-3)
            assert np.sqrt(np.mean(samples**2)) > 0.01, f"{row['id']} is silent"
            words = row["transcript"].split()
            assert 3 <= len(words) <= 6 and set(words) <= vocabulary


def test_held_out_combinations_only_in_test(data_dir):
    """Default rule: no test caption or sentence (nor voice) occurs in train or validation."""
    for task, field in (("image", "caption"), ("video", "caption"), ("speech", "transcript")):
        test = {r[field] for r in rows(data_dir, task, "test")}
        seen = {r[field] for split in ("train", "validation") for r in rows(data_dir, task, split)}
        assert test and seen and not test & seen, task
    assert {r["voice"] for r in rows(data_dir, "speech", "test")} <= set(TEST_VOICES)
    assert {r["voice"] for split in ("train", "validation") for r in rows(data_dir, "speech", split)} <= set(TRAIN_VOICES)
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["held_out"]["rule"] == "combinations"
    for task, combos in meta["held_out"]["combinations"].items():
        assert {tuple(c) for c in combos} == grammar.held_out_combinations(task, seed=0)


@pytest.mark.parametrize("task", ["image", "video", "speech"])
def test_held_out_combinations_keep_every_attribute_pair_in_training(task):
    held_out = grammar.held_out_combinations(task, seed=0)
    combos = grammar.COMBINATIONS[task]()
    assert len(held_out) == round(grammar.TEST_FRACTION * len(combos))
    assert held_out == grammar.held_out_combinations(task, seed=0) != grammar.held_out_combinations(task, seed=1)
    train = grammar.combinations_for_split(task, "train")
    assert set(train) == set(combos) - held_out and set(grammar.combinations_for_split(task, "test")) == held_out
    pairs = lambda cs: set().union(*(grammar._value_pairs(c) for c in cs))  # noqa: E731
    assert pairs(train) == pairs(combos)  # e.g. every colour with every shape, every shape at every size


def test_pairs_rule_holds_colour_shape_pairs_out_of_training(tmp_path):
    small = {task: {split: 3 for split in SPLITS} for task in TASKS}
    make_demo_data(tmp_path, seed=0, sizes=small, holdout="pairs")
    held_out = set(HELD_OUT_PAIRS)
    for split in SPLITS:
        texts = [r["caption"] for task in ("image", "video") for r in rows(tmp_path, task, split)]
        texts += [r["transcript"] for r in rows(tmp_path, "speech", split)]
        pairs = [colour_shape(text) for text in texts]
        if split == "test":
            assert all(pair in held_out for pair in pairs)
        else:
            assert not any(pair in held_out for pair in pairs)
    assert json.loads((tmp_path / "meta.json").read_text())["held_out"]["colour_shape_pairs"] == [list(p) for p in HELD_OUT_PAIRS]
    with pytest.raises(ValueError, match="Unknown holdout rule 'voices'"):
        make_demo_data(tmp_path / "other", holdout="voices")


def test_grammar_keeps_every_word_in_training():
    train_pairs = {c[:2] for c in grammar.combinations_for_split("image", "train", holdout="pairs")}
    assert {c for c, _ in train_pairs} == set(grammar.COLOURS) and {s for _, s in train_pairs} == set(grammar.SHAPES)
    assert not set(TEST_VOICES) & set(TRAIN_VOICES)
    sentences = [grammar.sentence(c) for c in grammar.sentence_combinations()]
    assert len(set(sentences)) == len(sentences) and all(3 <= len(s.split()) <= 6 for s in sentences)
    # The default test splits need distinct captions for retrieval: >= 150 images, >= 60 videos.
    assert len(grammar.combinations_for_split("image", "test")) >= 150
    assert len(grammar.combinations_for_split("video", "test")) >= 60


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(data_dir, tmp_path):
    again = tmp_path / "again"
    make_demo_data(again, seed=0, sizes=SMALL)
    assert tree_digest(again) == tree_digest(data_dir)
    other = tmp_path / "other"
    make_demo_data(other, seed=1, sizes=SMALL)
    assert manifest_path(other, "image", "train").read_text() != manifest_path(data_dir, "image", "train").read_text()


def test_same_arguments_reuse_existing_data(data_dir):
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    make_demo_data(data_dir, seed=0, sizes=SMALL)
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("frequency,kept", [(1000, True), (10_000, False)])
def test_resampler_keeps_the_band_and_removes_aliases(frequency, kept):
    """22.05 kHz -> 16 kHz: a 1 kHz tone survives; a 10 kHz tone (above the new 8 kHz Nyquist) is filtered
    instead of folding back to 6 kHz."""
    t = np.arange(22_050) / 22_050
    tone = (0.5 * 32767 * np.sin(2 * np.pi * frequency * t)).astype(np.int16)
    out = speech.resample(tone, 22_050).astype(np.float64) / 32767
    assert abs(len(out) - 16_000) <= 2
    rms = np.sqrt(np.mean(out[1000:-1000] ** 2))
    if kept:
        spectrum = np.abs(np.fft.rfft(out))
        assert np.argmax(spectrum) * 16_000 / len(out) == pytest.approx(1000, abs=2)
        assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    else:
        assert rms < 0.01


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        make_demo_data(tmp_path / "out", sizes=SMALL)
    assert not (tmp_path / "out").exists()
    # Without speech, espeak-ng is not needed.
    no_speech = {**SMALL, "speech": {"train": 0, "validation": 0, "test": 0}, "video": {"train": 0, "validation": 0, "test": 0}}
    make_demo_data(tmp_path / "images_only", sizes=no_speech)
    assert read_manifest(tmp_path / "images_only", "speech", "train") == []


BAD_ARGUMENTS = [
    ("unknown task", {"sizes": {"audio": {"train": 1}}}, ValueError, "Unknown task"),
    ("unknown split", {"sizes": {"image": {"dev": 1}}}, ValueError, "Unknown split"),
    ("negative size", {"sizes": {"image": {"train": -1}}}, ValueError, "non-negative"),
    ("odd video size", {"video_size": 33}, ValueError, "even video_size"),
]


@pytest.mark.parametrize("name,kwargs,error,message", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments(name, kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message):
        make_demo_data(tmp_path / "out", **kwargs)


def test_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no demo data"):
        make_demo_data(tmp_path, sizes=SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"
