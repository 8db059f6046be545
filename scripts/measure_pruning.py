"""Structured magnitude pruning of the LM's MLP, measured on the held-out split: does it earn a place in the package?

    python scripts/measure_pruning.py CHECKPOINT DATA --out /tmp/pruning.json --amounts 0.1 0.25 0.5

For every decoder layer of a LLaMA-style LM (gate_proj, up_proj, down_proj), `torch.nn.utils.prune.ln_structured`
picks the intermediate channels whose up_proj rows have the smallest L2 norm; those channels are then removed
for real (gate_proj and up_proj rows, down_proj columns, `intermediate_size` in the config), so the saved model is
smaller and faster, not just masked. No training after pruning. Each pruned model is saved, reloaded and scored
like the demo (`demo.evaluate_on_test`); the JSON holds, per amount, the weights size ratio and each held-out
score minus the unpruned model's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.demo import evaluate_on_test
from modeling_multimodal.processing import MultimodalProcessor


def _sliced(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """`linear` with only the `keep` output rows (dim 0) or input columns (dim 1)."""
    weight = linear.weight.data.index_select(dim, keep)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data if dim == 1 else linear.bias.data.index_select(0, keep))
    return out


def prune_mlp(model, amount: float) -> int:
    """Remove `amount` of every MLP's intermediate channels in place (see the module docstring); the new width."""
    widths = set()
    for index, layer in enumerate(model.model.language_model.layers):
        mlp = layer.mlp
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"layer {index}: pruning here expects a gated MLP (gate_proj, up_proj, down_proj), got {type(mlp).__name__}")
        prune.ln_structured(mlp.up_proj, "weight", amount=amount, n=2, dim=0)
        keep = mlp.up_proj.weight_mask.any(dim=1).nonzero().squeeze(1)
        prune.remove(mlp.up_proj, "weight")
        mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, keep, 0), _sliced(mlp.up_proj, keep, 0)
        mlp.down_proj = _sliced(mlp.down_proj, keep, 1)
        widths.add(len(keep))
    (width,) = widths  # ln_structured removes round(amount * n) channels per layer: the same width everywhere
    model.config.text_config.intermediate_size = width
    model.model.language_model.config.intermediate_size = width
    return width


def weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path, help="the demo data folder (its *_test.jsonl are scored)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    args = parser.parse_args(argv)
    base, _ = evaluate_on_test(args.checkpoint, args.data, num_examples=0)
    results = {"checkpoint": str(args.checkpoint), "float32": base, "pruned": {}}
    for amount in args.amounts:
        model = MultimodalForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        width = prune_mlp(model, amount)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            MultimodalProcessor.from_pretrained(args.checkpoint).save_pretrained(folder)
            scores, _ = evaluate_on_test(Path(folder), args.data, num_examples=0)
            ratio = weights_bytes(Path(folder)) / weights_bytes(args.checkpoint)
        results["pruned"][str(amount)] = {
            "intermediate_size": width, "weights_ratio": ratio, "scores": scores,
            "change": {key: scores[key] - base[key] for key in base if isinstance(base[key], float)},
        }
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({"amount": amount, "weights_ratio": ratio, **{k: round(v, 3) for k, v in results["pruned"][str(amount)]["change"].items() if "exact_match" in k or k.endswith("/wer")}}), flush=True)
    return results


if __name__ == "__main__":
    main()
