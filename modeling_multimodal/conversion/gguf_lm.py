"""GGUF causal LM → a Hugging Face folder (config, float32 safetensors, tokenizer, generation config).

transformers already reads GGUF (`from_pretrained(folder, gguf_file=...)`, through the `gguf` package):
it dequantises every tensor to float32, un-permutes llama's q/k rows and rebuilds the tokenizer from the
GGUF vocabulary, special ids and chat template. We reuse that and save the result as an ordinary
checkpoint, so later loads take seconds and need neither `gguf` nor `gguf_file=`.

The weights stay float32: a Q4_1 block is `d·q + m` with float16 `d`, `m`, exact in float32, so the
folder's logits equal those of the direct GGUF load (bfloat16 would round them).
"""

from __future__ import annotations

from pathlib import Path

from .output import atomic_output


def check_gguf_file(gguf_path: Path) -> None:
    """Raise a ValueError naming the file when its header does not parse or its tensors run past its end.

    The `gguf` reader (which transformers uses) reports a file cut inside its header as a bare `struct.error`
    and one cut inside its tensor data as "cannot reshape array", neither naming the file; its reader maps the
    file without copying it, so checking first costs no more than the header.
    """
    import struct

    from gguf import GGUFReader

    size = gguf_path.stat().st_size
    try:
        reader = GGUFReader(gguf_path)
    except (struct.error, ValueError, IndexError, KeyError, OverflowError) as err:
        raise ValueError(f"GGUF file {gguf_path} ({size} bytes) is truncated or not a GGUF file: the gguf reader cannot map it ({err})") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ValueError(f"GGUF file {gguf_path} is truncated: tensor {tensor.name!r} ends at byte {end}, the file has {size}")


def convert_gguf_lm(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert the GGUF file `gguf_path` into a Hugging Face causal-LM folder at `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    check_gguf_file(gguf_path)
    # dequantize=True: plain float32 tensors even where a GGUF matmul kernel would keep the blocks packed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype="float32",
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path} carries no tokenizer.chat_template; the converted LM would lose its chat format")
    # The weights are dense now: the saved folder must not claim to be GGUF-quantised.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # Loading-time flags that from_pretrained put in the init kwargs; a saved folder should not carry them.
    for key in ("is_local", "local_files_only", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = model.config.max_position_embeddings
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    with atomic_output(out_dir, gguf_path, "gguf-lm", overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
