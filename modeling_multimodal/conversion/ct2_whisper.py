"""CTranslate2 Whisper (`model.bin`) → a Hugging Face Whisper folder, read without ctranslate2.

`model.bin` (binary version 6, written by ctranslate2's `specs/model_spec.py::_serialize`) is:
`u32 version, str spec name, u32 spec revision, u32 n` then n × `(str name, u8 rank, u32 dims[rank],
u8 dtype, u32 nbytes, bytes)` then `u32 m` and m × `(str alias, str target)`; every `str` is
`u16 length incl. NUL, utf-8 bytes, NUL`. dtypes: float32, int8, int16, int32, float16, bfloat16; an int8
/int16 weight `x` comes with `x_scale` (row-wise, `x_int = round(x * scale)`), which we divide back out.

CTranslate2 fuses Whisper's attention projections: self-attention `linear_0` is [q; k; v] (with a zero
k bias, since Whisper's `k_proj` has none), cross-attention `linear_0` is q and `linear_1` is [k; v].
The output folder is laid out like `openai/whisper-tiny.en` / `openai/whisper-base`: float32 weights,
`WhisperConfig`, the feature extractor, the tokenizer (from the shipped `tokenizer.json`, plus the 1501
timestamp tokens the Hub tokenizers carry) and a generation config with the Hub's decoding settings.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .output import atomic_output, check_loads

CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
SUPPORTED_BINARY_VERSIONS = (5, 6)
# Whisper's special tokens by role, as the tokenizer names them.
SOT, EOT, NO_TIMESTAMPS, PREV, TRANSCRIBE, TRANSLATE = (
    "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>", "<|startofprev|>", "<|transcribe|>", "<|translate|>",
)
NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> … <|30.00|> in steps of 0.02 s
SAMPLING_RATE = 16000


def _model_bytes(src: str | Path | list) -> bytes:
    """The bytes of `model.bin`: from a CT2 folder, one file, or the ordered list of its split parts."""
    if isinstance(src, (list, tuple)):
        parts = [Path(p) for p in src]
    else:
        src = Path(src)
        parts = [src / "model.bin" if src.is_dir() else src]
    for part in parts:
        if not part.is_file():
            raise FileNotFoundError(f"CTranslate2 model file {part} does not exist")
    return b"".join(part.read_bytes() for part in parts)


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 bits into a float32's upper half
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def read_ct2_model(src: str | Path | list) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {variable name: array}) from a CTranslate2 `model.bin`; aliases resolved, weights float32.

    Scalars (flags such as `decoder/pre_norm`, head counts) keep their integer dtype; every float tensor,
    and every int8/int16 tensor that has a `_scale`, comes back dequantised to float32.
    """
    data = _model_bytes(src)
    offset = 0

    def unpack(fmt):
        nonlocal offset
        value = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def string():
        nonlocal offset
        length = unpack("<H")
        value = data[offset : offset + length - 1].decode("utf-8")
        offset += length
        return value

    version = unpack("<I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(f"{src}: CTranslate2 model.bin binary version {version} is not supported (expected one of {SUPPORTED_BINARY_VERSIONS})")
    try:
        spec, _revision, count = string(), unpack("<I"), unpack("<I")
        raw: dict[str, tuple[np.ndarray, str]] = {}
        for _ in range(count):
            name = string()
            shape = [unpack("<I") for _ in range(unpack("<B"))]
            dtype = CT2_DTYPES[unpack("<B")]
            nbytes = unpack("<I")
            storage = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
            raw[name] = (np.frombuffer(data, dtype=storage, count=nbytes // np.dtype(storage).itemsize, offset=offset).reshape(shape), dtype)
            offset += nbytes
        aliases = {string(): string() for _ in range(unpack("<I"))}
    except (struct.error, ValueError) as error:  # ran past the end of the bytes
        raise ValueError(f"{src}: CTranslate2 model.bin is truncated (a split part missing?): {error}") from error
    if offset != len(data):
        raise ValueError(f"{src}: CTranslate2 model.bin has {len(data) - offset} bytes after its last variable (parts in the wrong order or one too many?)")
    # An alias names another variable with equal contents. Scales are resolved before dequantising (equal
    # scales of different weights get aliased); a weight alias takes its target's dequantised value (the
    # alias has no `_scale` of its own, e.g. Whisper's output projection tied to the embeddings).
    for alias, target in aliases.items():
        if alias.endswith("_scale"):
            raw[alias] = raw[target]

    variables = {}
    for name, (array, dtype) in raw.items():
        if name.endswith("_scale"):
            continue
        scale = raw.get(f"{name}_scale")
        if scale is not None:  # quantised: x_int = round(x * scale) row-wise
            values = array.astype(np.float32).reshape(array.shape[0], -1) / _to_float32(*scale).reshape(-1, 1)
            variables[name] = values.reshape(array.shape)
        elif dtype in ("float32", "float16", "bfloat16"):
            variables[name] = _to_float32(array, dtype)
        else:
            variables[name] = array
    for alias, target in aliases.items():
        if not alias.endswith("_scale"):
            variables[alias] = variables[target]
    return spec, variables


def _num_layers(variables: dict, side: str) -> int:
    """How many `{side}/layer_<i>/…` blocks the model has."""
    return len({m.group(1) for name in variables if (m := re.match(rf"{side}/layer_(\d+)/", name))})


def _split_rows(array: np.ndarray, parts: int) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise ValueError(f"cannot split a fused projection of {array.shape[0]} rows into {parts} equal parts")
    return np.split(array, parts, axis=0)


def whisper_state_dict(variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables onto `WhisperForConditionalGeneration`'s parameter names (unfused)."""
    state: dict[str, np.ndarray] = {}

    def linear(ct2: str, hf: str, bias: bool = True):
        state[f"{hf}.weight"] = variables[f"{ct2}/weight"]
        if bias:
            state[f"{hf}.bias"] = variables[f"{ct2}/bias"]

    def norm(ct2: str, hf: str):
        state[f"{hf}.weight"], state[f"{hf}.bias"] = variables[f"{ct2}/gamma"], variables[f"{ct2}/beta"]

    def fused(ct2: str, hf: str, projections: tuple[str, ...]):
        weights = _split_rows(variables[f"{ct2}/weight"], len(projections))
        biases = _split_rows(variables[f"{ct2}/bias"], len(projections))
        for name, weight, bias in zip(projections, weights, biases):
            state[f"{hf}.{name}.weight"] = weight
            if name == "k_proj":  # Whisper's key projection has no bias; CT2 stores zeros
                if np.any(bias):
                    raise ValueError(f"{ct2}/bias: expected a zero key bias (Whisper's k_proj has none)")
            else:
                state[f"{hf}.{name}.bias"] = bias

    for side in ("encoder", "decoder"):
        state[f"model.{side}.embed_positions.weight"] = variables[f"{side}/position_encodings/encodings"]
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(_num_layers(variables, side)):
            ct2, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
            linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            if side == "decoder":
                norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
                linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
                linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
            norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    state["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    if not np.array_equal(variables["decoder/projection/weight"], variables["decoder/embeddings/weight"]):
        raise ValueError("decoder/projection/weight differs from decoder/embeddings/weight; Whisper ties them")
    return {name: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) for name, array in state.items()}


def _whisper_tokenizer(src_dir: Path, vocab_size: int):
    """WhisperTokenizer from the shipped `tokenizer.json`, with the Hub's 1501 timestamp tokens appended."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    tokenizer_file = src_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{src_dir} has no tokenizer.json (the CTranslate2 Whisper folder ships one)")
    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_file), pad_token=EOT, model_max_length=1024)
    missing = [t for t in (SOT, EOT, NO_TIMESTAMPS, PREV, TRANSCRIBE, TRANSLATE) if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"{tokenizer_file} lacks Whisper's special tokens {missing}")
    timestamps = [AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False) for i in range(NUM_TIMESTAMP_TOKENS)]
    tokenizer.add_tokens(timestamps)
    if len(tokenizer) != vocab_size:
        raise ValueError(f"{tokenizer_file}: {len(tokenizer)} tokens with timestamps, but the model's vocabulary has {vocab_size}")
    vocabulary = src_dir / "vocabulary.txt"
    if vocabulary.is_file():  # CT2's own id → token list must agree with the tokenizer's ids
        tokens = vocabulary.read_text(encoding="utf-8").split("\n")
        for token in (SOT, EOT, NO_TIMESTAMPS, "<|0.00|>"):
            if tokens[tokenizer.convert_tokens_to_ids(token)] != token:
                raise ValueError(f"{vocabulary}: {token} is not at id {tokenizer.convert_tokens_to_ids(token)} as in tokenizer.json")
    return tokenizer


def _ids(tokenizer) -> dict[str, int]:
    return {role: tokenizer.convert_tokens_to_ids(token) for role, token in
            (("sot", SOT), ("eot", EOT), ("no_timestamps", NO_TIMESTAMPS), ("prev", PREV), ("transcribe", TRANSCRIBE), ("translate", TRANSLATE))}


def whisper_config(variables: dict[str, np.ndarray], tokenizer, decoding: dict):
    """`WhisperConfig` read off the weights' shapes and the tokenizer's special ids."""
    from transformers import WhisperConfig

    ids = _ids(tokenizer)
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_num_layers(variables, "encoder"),
        decoder_layers=_num_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=ids["eot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
        # Decoding settings live in generation_config.json only (transformers v5 warns about both).
        suppress_tokens=None,
        begin_suppress_tokens=None,
        scale_embedding=False,
        architectures=["WhisperForConditionalGeneration"],
    )


def whisper_generation_config(config, tokenizer, decoding: dict):
    """The decoding settings the Hub's `openai/whisper-*` checkpoints publish, with this vocabulary's ids.

    English-only models force `<|notimestamps|>` at position 1; multilingual ones leave the language
    (position 1) to detection and force `<|transcribe|>` at position 2, and carry `lang_to_id`/`task_to_id`.
    """
    from transformers import GenerationConfig

    ids = _ids(tokenizer)
    multilingual = config.vocab_size >= 51865  # as transformers decides it; tiny.en has 51864
    values = dict(
        alignment_heads=[list(pair) for pair in decoding["alignment_heads"]],
        begin_suppress_tokens=decoding["suppress_ids_begin"],
        suppress_tokens=decoding["suppress_ids"],
        bos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
        max_length=config.max_target_positions,
        return_timestamps=False,
    )
    if multilingual:
        values["forced_decoder_ids"] = [[1, None], [2, ids["transcribe"]]]
        values["lang_to_id"] = {tokenizer.convert_ids_to_tokens(i): i for i in decoding["lang_ids"]}
        values["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    else:
        values["forced_decoder_ids"] = [[1, ids["no_timestamps"]]]
    return GenerationConfig(**values)


def convert_ct2_whisper(src: str | Path | list, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert a CTranslate2 Whisper model into a Hugging Face Whisper folder at `out_dir`.

    `src` is the CT2 folder (`model.bin`, `config.json`, `tokenizer.json`, `vocabulary.txt`) or the ordered
    list of `model.bin` split parts, whose first part's folder holds those other files.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    src_dir = Path(src[0]).parent if isinstance(src, (list, tuple)) else Path(src)
    spec, variables = read_ct2_model(src)
    if spec != "WhisperSpec":
        raise ValueError(f"{src}: a CTranslate2 {spec} model, expected WhisperSpec")
    decoding_file = src_dir / "config.json"
    if not decoding_file.is_file():
        raise FileNotFoundError(f"{src_dir} has no config.json (CTranslate2's suppress_ids / lang_ids / alignment_heads)")
    decoding = json.loads(decoding_file.read_text())
    tokenizer = _whisper_tokenizer(src_dir, vocab_size=variables["decoder/embeddings/weight"].shape[0])
    config = whisper_config(variables, tokenizer, decoding)
    generation_config = whisper_generation_config(config, tokenizer, decoding)
    state = whisper_state_dict(variables)
    with atomic_output(out_dir, src, "ct2-whisper", overwrite) as tmp:
        config.save_pretrained(tmp)
        generation_config.save_pretrained(tmp)
        # proj_out is tied to embed_tokens (tie_word_embeddings), so it is not stored, as on the Hub.
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLING_RATE).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_loads(WhisperForConditionalGeneration, tmp)
    return Path(out_dir)
