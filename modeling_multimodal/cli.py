"""`modeling-multimodal {make-demo-data, train, evaluate, generate, push, demo}`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _make_demo_data(args):
    from .demo_data import make_demo_data

    meta = make_demo_data(args.out, seed=args.seed, holdout=args.holdout, overwrite=args.overwrite)
    print(json.dumps(meta.get("counts", meta), indent=2))


def _train(args):
    from .training.recipe import load_recipe
    from .training.trainer import train

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    overrides += (["overwrite_output_dir=true"] if args.overwrite else []) + ([f"threads={args.threads}"] if args.threads else [])
    result = train(load_recipe(args.recipe, overrides))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str))


def _evaluate(args):
    from .threads import set_threads

    set_threads(args.threads, request=True)
    from .evaluation.tasks import evaluate_task
    from .modeling_multimodal import MultimodalForConditionalGeneration
    from .processing import MultimodalProcessor
    from .training.data import load_manifest

    model = MultimodalForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    processor = MultimodalProcessor.from_pretrained(args.checkpoint)
    rows = load_manifest(Path(args.root) / args.manifest, root=args.root)
    if args.max_samples:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    scores, samples = evaluate_task(
        model, processor, list(rows), args.task, batch_size=args.batch_size, rerank_top_k=args.rerank_top_k
    )
    result = {"checkpoint": args.checkpoint, "manifest": args.manifest, "task": args.task, "scores": scores, "samples": samples}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def _generate(args):
    from .modeling_multimodal import MultimodalForConditionalGeneration
    from .processing import MultimodalProcessor

    model = MultimodalForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    processor = MultimodalProcessor.from_pretrained(args.checkpoint)
    content = [{"type": kind, kind: path} for kind in ("image", "audio", "video") for path in getattr(args, kind) or []]
    content.append({"type": "text", "text": args.prompt})
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip())


def _push(args):
    from .hub import push_checkpoint

    info = push_checkpoint(
        args.checkpoint, args.repo_id, revision=args.revision, private=args.private,
        merge_adapter=args.merge_adapter, base_model=args.base_model, max_shard_size=args.max_shard_size,
    )
    print(f"pushed {args.checkpoint} to {args.repo_id} at revision {info.oid}")


def _demo(args):
    from .threads import set_threads

    set_threads(args.threads, request=True)
    from .demo import run_ablation, run_demo

    if args.ablation:
        run_ablation(args.out, quick=args.quick, holdout=args.holdout)
    else:
        run_demo(args.out, quick=args.quick, holdout=args.holdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeling-multimodal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("make-demo-data", help="generate the demo's images, videos and speech with manifests")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--holdout", choices=("combinations", "pairs"), default="combinations",
        help="what only the test split uses: unseen attribute combinations, or (stricter) unseen colour+shape pairs",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_make_demo_data)

    p = commands.add_parser("train", help="train from a YAML recipe; key=value pairs override it")
    p.add_argument("--recipe", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace another run's checkpoints in output_dir")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.max_steps=50 stage=finetune")
    p.add_argument("--threads", type=int, help="torch threads per process (default: available cores / local processes)")
    p.set_defaults(func=_train)

    p = commands.add_parser("evaluate", help="score a checkpoint on a manifest")
    p.add_argument("checkpoint")
    p.add_argument("--root", required=True, help="data root the manifest's paths are relative to")
    p.add_argument("--manifest", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--max-samples", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--rerank-top-k", type=int, default=0,
        help="also re-rank each retrieval query's top k candidates by log p(text | media) (reranked_* scores)",
    )
    p.add_argument("--out")
    p.add_argument("--threads", type=int, help="torch threads per process (default: available cores / local processes)")
    p.set_defaults(func=_evaluate)

    p = commands.add_parser("generate", help="answer one prompt about media files")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append")
    p.add_argument("--audio", action="append")
    p.add_argument("--video", action="append")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=_generate)

    p = commands.add_parser("push", help="push a checkpoint folder to the Hub with its model card and code")
    p.add_argument("checkpoint")
    p.add_argument("repo_id")
    p.add_argument("--revision")
    p.add_argument("--private", action="store_true")
    p.add_argument("--merge-adapter", action="store_true")
    p.add_argument("--base-model")
    p.add_argument("--max-shard-size", help='shard the weights, e.g. "2GB"')
    p.set_defaults(func=_push)

    p = commands.add_parser("demo", help="the offline demo: data, encoders + pretrain + align + LoRA finetune, evaluate, reload, report")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")
    p.add_argument("--ablation", action="store_true", help="run the λ/α ablation instead")
    p.add_argument(
        "--holdout", choices=("combinations", "pairs"), default="combinations",
        help="the test split's rule (see make-demo-data --holdout); 'pairs' is the stricter colour+shape hold-out",
    )
    p.add_argument("--threads", type=int, help="torch threads per process (default: available cores / local processes)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"modeling-multimodal {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
