"""How fast can the demo's vision tower learn shape? A direct test outside the training pipeline.

Trains the demo's CLIP-style tower (96 wide, 2 layers, 64 px, 8-px patches) from scratch on the demo's
training images alone and prints the share of test images whose shape (circle, square, triangle, star)
it names, every 250 steps. What sits between the tower and the loss is chosen on the command line, which
is how the table under "What fixed video" in docs/RESULTS.md was measured (750 steps, one torch thread):

    python examples/diagnostics/shape_learning.py --data demo_output/data --stem conv --loss bag \
        --projector torch --steps 750

--loss classify: a 4-way shape classifier on the mean patch token; bag: the `media_bow` objective
(softmax cross-entropy against the caption's normalised bag of words), read at the four shape words.
--projector none|torch|normal: no projector, or the demo's MLP projector (96 -> 128 -> 128) with PyTorch's
default init or drawn from N(0, 0.02) as transformers' `_init_weights` does; --head-init likewise.
Needs the demo data (`modeling-multimodal make-demo-data DIR`); AdamW, no weight decay, 16 images a step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from modeling_multimodal.vision_stem import use_conv_stem

SHAPES = ["circle", "square", "triangle", "star"]


def load_split(data: Path, split: str, vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] (n, 3, 64, 64), shape labels (n,) and caption bags of words (n, vocab)."""
    rows = [json.loads(line) for line in open(data / f"image_{split}.jsonl")]
    pixels = np.stack([np.asarray(Image.open(data / row["image"]).convert("RGB")) for row in rows]).astype(np.float32) / 255
    pixels = (torch.from_numpy(pixels).permute(0, 3, 1, 2) - 0.5) / 0.5
    shapes = torch.tensor([SHAPES.index(row["attributes"]["shape"]) for row in rows])
    bags = torch.zeros(len(rows), len(vocab))
    for i, row in enumerate(rows):
        for word in row["caption"].split():
            bags[i, vocab.index(word)] = 1.0
    return pixels, shapes, bags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("demo_output/data"))
    parser.add_argument("--stem", choices=("patch", "conv"), default="patch")
    parser.add_argument("--loss", choices=("classify", "bag"), default="bag")
    parser.add_argument("--projector", choices=("none", "torch", "normal"), default="none")
    parser.add_argument("--head-init", choices=("torch", "normal"), default="torch")
    parser.add_argument("--projector-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vocab = sorted({w for split in ("train", "test") for line in open(args.data / f"image_{split}.jsonl") for w in json.loads(line)["caption"].split()})
    shape_ids = [vocab.index(word) for word in SHAPES]
    train_x, train_y, train_bags = load_split(args.data, "train", vocab)
    test_x, test_y, _ = load_split(args.data, "test", vocab)

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8))
    if args.stem == "conv":
        use_conv_stem(tower, 8)
    width = 96 if args.projector == "none" else 128
    projector = torch.nn.Identity() if args.projector == "none" else torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))
    head = torch.nn.Linear(width, 4 if args.loss == "classify" else len(vocab))
    normal = ([projector] if args.projector == "normal" else []) + ([head] if args.head_init == "normal" else [])
    for module in normal:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=0.02)
                torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.AdamW(
        [{"params": list(tower.parameters()), "lr": 1e-3},
         {"params": list(head.parameters()) + list(projector.parameters()), "lr": args.projector_lr}],
        weight_decay=0.0,
    )  # fmt: skip

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        return head(projector(tower(pixel_values=pixels).last_hidden_state[:, 1:]).mean(1))

    def shape_accuracy(pixels: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            scores = logits(pixels)
        scores = scores if args.loss == "classify" else scores[:, shape_ids]
        return (scores.argmax(-1) == labels).float().mean().item()

    started = time.time()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(train_x), (16,))
        out = logits(train_x[batch])
        if args.loss == "classify":
            loss = torch.nn.functional.cross_entropy(out, train_y[batch])
        else:
            bags = train_bags[batch] / train_bags[batch].sum(-1, keepdim=True)
            loss = -(bags * out.log_softmax(-1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == args.steps:
            print(
                f"{vars(args)} step {step}: test shape accuracy {shape_accuracy(test_x, test_y):.3f} "
                f"({time.time() - started:.0f} s)", flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    main()
