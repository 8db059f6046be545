"""Post-training quantization of the language model for CPU inference: one function to write, one to load.

Methods (`QUANTIZATION_METHODS`); the towers, projectors and retrieval head keep their float weights. The
training-only auxiliary heads (`L_auxiliary`) are left out: the quantized checkpoint is for inference, saved with
`auxiliary_loss_weight` 0.
- `dynamic-int8`: the decoder's Linear layers and the LM head become `quantized_layers.Int8DynamicLinear` (int8
  weights per output channel, activations quantized per token on each call, int8 GEMMs with int32 accumulation)
  and the token embeddings `Int8Embedding` (int8 rows); a tied head and embedding share one int8 matrix. An
  embedding of another class (e.g. one that scales its output) stays float, and so does a head tied to it.
- `int8-weight-only`, `int4-weight-only`: optimum-quanto's `qint8` / `qint4` weights for the decoder's Linear
  layers (int4 packed two per byte, with per-group scales and shifts), float activations;
  `pip install 'modeling-multimodal[quantize]'`.

The folder written by `quantize_checkpoint` holds the config and processor as `save_pretrained` writes them,
the weights as `model.quantized.safetensors` (plain tensors only: int8 values, scales, packed int4 bytes) and
`quantization.json` (method, library versions, the quantized modules). There is no `model.safetensors`, so a
plain `from_pretrained` refuses the folder instead of loading random weights; load it with
`load_quantized(folder)` (the CLI's `generate` and `evaluate` do so for such a folder). Float weights are float32
on load: the quantized kernels are CPU float32 kernels.

For training, `quantize_language_model_4bit` is QLoRA's half: the LM's Linear layers become bitsandbytes NF4
layers on the GPU (the recipe's `lora.quantize: 4bit`), and PEFT puts LoRA on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .constants import QUANTIZATION_FILE
from .input_checks import holds_quantized_weights
from .quantized_layers import Int8DynamicLinear, Int8Embedding

QUANTIZATION_METHODS = ("dynamic-int8", "int8-weight-only", "int4-weight-only")
QUANTIZED_WEIGHTS = "model.quantized.safetensors"
QUANTO_TYPES = {"int8-weight-only": "qint8", "int4-weight-only": "qint4"}
LANGUAGE_MODEL = "model.language_model"
QUANTO_HINT = "pip install 'modeling-multimodal[quantize]' (optimum-quanto)"
DYNAMIC_FORMAT = 2  # 1: torch.ao's per-tensor activations, which broke small LMs (docs/COMPRESSION.md)


def _language_model(model) -> nn.Module:
    return model.get_submodule(LANGUAGE_MODEL)


def _quanto():
    try:
        import optimum.quanto as quanto
    except ImportError as err:
        raise ImportError(f"the weight-only methods {tuple(QUANTO_TYPES)} need optimum-quanto: {QUANTO_HINT}") from err
    return quanto


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` under `root`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _quantize_dynamic(model) -> dict:
    """The decoder's Linear layers, its token embeddings and the LM head to int8 (in place); what was replaced.

    Returns {"modules": Linear layers under `LANGUAGE_MODEL`, "embeddings": {"input", "output", "tied"}}; an
    embedding of a subclass of `nn.Embedding` (its own forward) is kept, and with it a head tied to it.
    """
    language_model = _language_model(model)
    modules = [name for name, module in language_model.named_modules() if type(module) is nn.Linear]
    for name in modules:
        _replace(language_model, name, Int8DynamicLinear.from_linear(language_model.get_submodule(name)))
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {module: name for name, module in model.named_modules()}
    tied = isinstance(head, nn.Linear) and head.weight is getattr(embeddings, "weight", None)
    replaced = {"input": None, "output": None, "tied": False}
    if type(embeddings) is nn.Embedding:
        quantized = Int8Embedding.from_embedding(embeddings)
        _replace(model, names[embeddings], quantized)
        replaced["input"] = names[embeddings]
        if tied:  # the head's int8 matrix is the embedding's: one copy in memory and in the file
            linear = Int8DynamicLinear(head.in_features, head.out_features, bias=head.bias is not None)
            linear.weight_int8, linear.weight_scale = quantized.weight_int8, quantized.weight_scale
            _replace(model, names[head], linear)
            replaced.update(output=names[head], tied=True)
    if type(head) is nn.Linear and not tied:
        _replace(model, names[head], Int8DynamicLinear.from_linear(head))
        replaced["output"] = names[head]
    return {"modules": modules, "embeddings": replaced}


def _retie(model, embeddings: dict) -> None:
    """After loading: the tied head uses the embedding's int8 buffers again (the file holds them once)."""
    if embeddings.get("tied"):
        source, head = model.get_submodule(embeddings["input"]), model.get_submodule(embeddings["output"])
        head.weight_int8, head.weight_scale = source.weight_int8, source.weight_scale


def quantize_model(model, method: str) -> dict:
    """Quantize `model`'s language model in place (float32 first); returns what `quantization.json` records."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {QUANTIZATION_METHODS}")
    model.float().eval()
    language_model = _language_model(model)
    record = {"method": method, "torch": torch.__version__, "prefix": LANGUAGE_MODEL}
    if method == "dynamic-int8":
        record.update(_quantize_dynamic(model), format=DYNAMIC_FORMAT, activations="int8 per token")
    else:
        quanto = _quanto()
        quanto.quantize(language_model, weights=getattr(quanto, QUANTO_TYPES[method]))
        quanto.freeze(language_model)
        record["quantization_map"] = quanto.quantization_map(language_model)
        record["modules"] = sorted(record["quantization_map"])
        record["optimum-quanto"] = _version("optimum-quanto")
    if not record["modules"]:
        raise ValueError(f"{LANGUAGE_MODEL} has no Linear layers to quantize")
    return record


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def quantized_state_dict(model, record: dict) -> dict[str, torch.Tensor]:
    """The model's weights as plain tensors (what safetensors can hold); a tied weight is stored once."""
    state, seen = {}, {}
    for name, value in model.state_dict().items():
        if value.data_ptr() in seen:
            record.setdefault("tied", {})[name] = seen[value.data_ptr()]
            continue
        seen[value.data_ptr()] = name
        state[name] = value.detach().contiguous()
    return state


def quantize_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, method: str) -> Path:
    """Load `checkpoint` (a saved `MultimodalForConditionalGeneration` + processor), quantize, write `out`."""
    from .modeling_multimodal import MultimodalForConditionalGeneration
    from .processing import MultimodalProcessor

    from .folder_kind import require_model_folder

    require_model_folder(checkpoint, "quantize", accept=("multimodal",))  # before a model is built from it
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {str(out)!r} exists and is not empty; pick a new folder")
    # λ = 0: the auxiliary heads (L_auxiliary's CTC / bag of words) exist only for training; an inference checkpoint drops them
    model = MultimodalForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, auxiliary_loss_weight=0.0)
    processor = MultimodalProcessor.from_pretrained(checkpoint)
    record = quantize_model(model, method)
    state = quantized_state_dict(model, record)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    processor.save_pretrained(out)
    save_file(state, out / QUANTIZED_WEIGHTS, metadata={"format": "pt", "quantization": method})
    (out / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


QLORA_HINT = "pip install 'modeling-multimodal[qlora]' (bitsandbytes)"


def quantize_language_model_4bit(model, compute_dtype: torch.dtype = torch.bfloat16):
    """QLoRA: the LM's Linear layers replaced by bitsandbytes NF4 `Linear4bit` layers, quantized on the GPU (in place).

    Needs a CUDA GPU and bitsandbytes; without either a `ValueError` says what is missing (nothing is changed).
    The towers, projectors, embeddings and LM head stay as they are; LoRA then trains on top of the frozen NF4 weights.
    """
    if not torch.cuda.is_available():
        raise ValueError(
            "lora.quantize=4bit (QLoRA) loads the LM in 4-bit with bitsandbytes, which needs a CUDA GPU; none is "
            f"available here. Run on a GPU machine ({QLORA_HINT}), or remove lora.quantize to train LoRA unquantized."
        )
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError(f"lora.quantize=4bit (QLoRA) needs bitsandbytes: {QLORA_HINT}") from err
    language_model = _language_model(model)
    for name, module in list(language_model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=compute_dtype, quant_type="nf4"
        )
        quantized.weight = bnb.nn.Params4bit(module.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data.to(compute_dtype), requires_grad=False)
        _replace(language_model, name, quantized.cuda())  # .cuda() quantizes to NF4
    return model


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANTIZATION_FILE).is_file()


def quantized_folder(source: str | os.PathLike, revision: str | None = None) -> Path | None:
    """The local folder of a quantized checkpoint: `source` itself, or the snapshot of a Hub repo (`push` uploads a
    quantized folder as it is) that holds `quantization.json`; None for anything else (a float checkpoint, a repo
    without the file, or a Hub that cannot be reached: the caller's own loading then says why)."""
    if not holds_quantized_weights(source, revision):
        return None
    if os.path.isdir(str(source)):
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), revision=revision))


def _check_stored_tensors(file: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], quanto_prefixes=()) -> None:
    """Every tensor in the quantized weights has the dtype and shape the model built from the config expects.

    `load_state_dict` casts on copy, so a float32 scale whose header was re-declared int32 would load silently
    (logits off by ~1e12), and a changed shape ends in a RuntimeError naming no file. Tensors the model has are
    compared with its own; quanto's parts (`<module>.weight._data` / `._scale` / `._shift`, `input_scale`,
    `output_scale`), which it builds itself, must be integer data and floating-point scales.
    """
    for name, value in state.items():
        if name in expected:
            want = expected[name]
            if value.dtype != want.dtype or value.shape != want.shape:
                raise ValueError(
                    f"{file}: tensor {name!r} is {value.dtype} {list(value.shape)}, but the config's model expects "
                    f"{want.dtype} {list(want.shape)}; the file was altered or written for another config"
                )
        elif name.startswith(tuple(quanto_prefixes)):
            integer = name.endswith("._data")
            if integer == torch.is_floating_point(value):
                kind = "integer" if integer else "floating-point"
                raise ValueError(f"{file}: tensor {name!r} is {value.dtype}, expected a {kind} tensor; the file was altered")


def load_quantized(path: str | os.PathLike, revision: str | None = None):
    """(model in eval mode, processor) from a folder written by `quantize_checkpoint`, or a Hub repo id it was pushed
    to (at `revision`); CPU, float32 activations."""
    from .configuration import MultimodalConfig
    from .modeling_multimodal import MultimodalForConditionalGeneration
    from .processing import MultimodalProcessor

    folder = quantized_folder(path, revision)
    if folder is None:
        raise ValueError(f"{str(path)!r} is not a quantized checkpoint (no {QUANTIZATION_FILE}); load it with from_pretrained")
    path = folder
    record = json.loads((path / QUANTIZATION_FILE).read_text())
    if record.get("method") not in QUANTIZATION_METHODS:
        raise ValueError(f"{path / QUANTIZATION_FILE}: unknown method {record.get('method')!r}; expected one of {QUANTIZATION_METHODS}")
    from safetensors import SafetensorError

    try:
        state = load_file(path / QUANTIZED_WEIGHTS)
    except (SafetensorError, FileNotFoundError) as err:
        raise ValueError(f"{path / QUANTIZED_WEIGHTS} cannot be read ({err}): a missing, corrupt or truncated file") from None
    model = MultimodalForConditionalGeneration(MultimodalConfig.from_pretrained(path)).float().eval()
    quantized = ()  # names load_state_dict may report missing: the quanto modules it filled itself
    if record["method"] == "dynamic-int8":  # the same swap as when quantizing, then the whole state loads
        if record.get("format") != DYNAMIC_FORMAT:
            raise ValueError(
                f"{path}: written by an earlier dynamic-int8 (per-tensor activations, format {record.get('format', 1)}); "
                "quantize the float32 checkpoint again"
            )
        swapped = _quantize_dynamic(model)
        if swapped != {"modules": record["modules"], "embeddings": record["embeddings"]}:
            raise ValueError(f"{path}: the model's layers differ from the quantized ones in {QUANTIZATION_FILE}")
        _check_stored_tensors(path / QUANTIZED_WEIGHTS, state, model.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        _retie(model, record["embeddings"])
    else:  # quanto swaps the layers from its map, then the whole state loads
        language_model, prefix = _language_model(model), record["prefix"] + "."
        quantized = tuple(prefix + name + "." for name in record["modules"])
        lm_state = {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
        float_shapes = {name: value.shape for name, value in model.state_dict().items()}
        _check_stored_tensors(path / QUANTIZED_WEIGHTS, state, model.state_dict(), quantized)
        try:
            _quanto().requantize(language_model, lm_state, record["quantization_map"], device=torch.device("cpu"))
            missing, unexpected = model.load_state_dict(state, strict=False)
        except (RuntimeError, KeyError) as err:  # a quanto part of the wrong shape, or a module map that does not fit
            raise ValueError(f"{path / QUANTIZED_WEIGHTS} does not fit {QUANTIZATION_FILE} and the config: {err}") from None
        for name in record["modules"]:  # quanto takes a part's shape as stored: each weight must keep its layer's shape
            stored, want = language_model.get_submodule(name).weight, float_shapes[prefix + name + ".weight"]
            try:
                shape = stored.dequantize().shape if stored.shape == want else stored.shape
            except RuntimeError:  # data and scales that do not broadcast
                shape = "parts that do not fit together"
            if shape != want:
                raise ValueError(
                    f"{path / QUANTIZED_WEIGHTS}: the weight of {prefix + name!r} has {shape}, but the config's layer "
                    f"is {list(want)}; the file was altered or written for another config"
                )
    missing = [name for name in missing if not name.startswith(quantized) and name not in record.get("tied", {})]
    if missing or unexpected:
        raise ValueError(f"{path / QUANTIZED_WEIGHTS} does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if record["method"] != "dynamic-int8":
        model.tie_weights()
    return model.eval(), MultimodalProcessor.from_pretrained(path)


__all__ = [
    "QUANTIZATION_METHODS", "is_quantized_checkpoint", "load_quantized", "quantize_checkpoint", "quantize_language_model_4bit",
    "quantize_model",
]
