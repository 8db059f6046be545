"""Share checkpoints on the Hugging Face Hub: model cards, merged LoRA weights and one-commit pushes.

What is unusual here: we do not call `model.push_to_hub`. transformers' push rewrites README.md with
its own auto-generated card; `push_checkpoint` instead uploads the checkpoint folder in a single
`create_commit` whose README.md is our card (`model_cards/multimodal_model_card.md`, rendered with
`huggingface_hub.ModelCard.from_template`). The commit mirrors the folder: files from an earlier push
that the folder no longer has are deleted, so a revision never mixes two checkpoints' shards.

A checkpoint folder carries what its card needs in `model_card_inputs.json`: the keyword arguments of
`render_model_card` (the trainer writes it with `write_model_card_inputs`). Without it the card is
rendered from what `config.json` / `adapter_config.json` tell.

A push reads nothing outside its folder (a file that is a symlink to somewhere else is refused) and no
request waits forever: huggingface_hub's shared HTTP client has no timeout of its own, so a server that
accepts a connection and never answers would hang the push; `push_checkpoint(timeout=...)` bounds each
request and turns a silent or unreachable Hub into a `TimeoutError` / `ConnectionError` naming the endpoint.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard
from huggingface_hub import ModelCardData


logger = logging.getLogger(__name__)

TEMPLATE_NAME = "multimodal_model_card.md"
CARD_INPUTS_FILENAME = "model_card_inputs.json"
DEFAULT_COMMIT_MESSAGE = "Upload checkpoint with modeling-multimodal"
# Trainer state and other files a checkpoint folder may hold that do not belong in a model repo.
IGNORE_PATTERNS = (
    "README.md", ".*", "*/.*", "__pycache__/*", "*.pyc", "optimizer.*", "scheduler.*", "rng_state*",
    "scaler.pt", "training_args.bin", "trainer_state.json", "checkpoint-*/*", "runs/*",
)  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_PUSH_TIMEOUT_S = 60.0  # per request: connecting, each write and waiting for each answer
REPO_ID_PATTERN = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")

# Per modality: (placeholder, accepted input, processor output, retrieval feature method).
MODALITY_ROWS = {
    "image": ("`<image>`", "PIL image, numpy array, path or bytes", "`pixel_values`", "get_image_features"),
    "audio": ("`<audio>`", "16 kHz waveform (numpy), path or bytes", "`input_features`", "get_audio_features"),
    "video": ("`<video>`", "video file path or frames", "`pixel_values_videos`", "get_video_features"),
}
MODALITY_TAGS = {"image": "vision", "audio": "audio", "video": "video"}
# Hub task ids for the metrics modeling_multimodal.evaluation computes, used when a result names no task.
DEFAULT_TASK_BY_METRIC = {
    "wer": "automatic-speech-recognition",
    "cer": "automatic-speech-recognition",
    "bleu": "image-text-to-text",
    "exact_match": "visual-question-answering",
    "recall": "feature-extraction",  # text_to_media_recall@k, media_to_text_recall@k
}


def template_path() -> Path:
    """The card template, shipped as package data of `modeling_multimodal.model_cards` (see setup.py)."""
    path = Path(str(package_files("modeling_multimodal.model_cards") / TEMPLATE_NAME))
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {TEMPLATE_NAME} is missing from {path.parent}; reinstall the package")
    return path


# ---------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------
def _eval_rows(eval_results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalize results to one row per metric: {task, dataset, dataset_name, split, metric, value}.

    A result is either one metric (`metric`, `value`) or a group (`metrics`: {name: value}); both need
    `dataset` (a Hub dataset id) and may give `split`, `dataset_name` and `task` (else guessed from the metric).
    """
    rows = []
    for index, result in enumerate(eval_results):
        if "dataset" not in result:
            raise ValueError(f"eval_results[{index}] has no 'dataset' (a Hub dataset id): {dict(result)}")
        if "metrics" in result:
            metrics = dict(result["metrics"])
        elif "metric" in result and "value" in result:
            metrics = {result["metric"]: result["value"]}
        else:
            raise ValueError(f"eval_results[{index}] needs 'metric' and 'value', or 'metrics': {dict(result)}")
        for metric, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"eval_results[{index}]: metric {metric!r} has a non-numeric value {value!r}")
            family = "recall" if "recall" in metric else metric
            task = result.get("task") or DEFAULT_TASK_BY_METRIC.get(family)
            if task is None:
                raise ValueError(f"eval_results[{index}]: no 'task' given and none known for metric {metric!r}")
            rows.append(
                {
                    "task": task,
                    "dataset": result["dataset"],
                    "dataset_name": result.get("dataset_name") or result["dataset"],
                    "split": result.get("split") or "",
                    "metric": metric,
                    "value": round(float(value), 4),
                }
            )
    return rows


def _usage_snippet(repo_id: str, modalities: Sequence[str], adapter_base_model: str | None) -> str:
    media = [m for m in modalities if m in MODALITY_ROWS]
    prompt = "".join(f"<{m}>" for m in media) + "Describe this."
    media_kwargs = {"image": 'images=[Image.open("example.jpg")]', "audio": "audio=[waveform]", "video": 'videos=["example.mp4"]'}
    call = ", ".join([f'text="{prompt}"', *(media_kwargs[m] for m in media), 'return_tensors="pt"'])
    lines = ["from transformers import AutoModelForImageTextToText, AutoProcessor"]
    if adapter_base_model:
        lines += [
            "from peft import PeftModel",
            "",
            f'base = AutoModelForImageTextToText.from_pretrained("{adapter_base_model}", trust_remote_code=True)',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'processor = AutoProcessor.from_pretrained("{adapter_base_model}", trust_remote_code=True)',
        ]
    else:
        lines += [
            "",
            f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)',
            f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)',
        ]
    if "image" in media:
        lines.insert(0, "from PIL import Image")
    lines += [
        "",
        f"inputs = processor({call})",
        "generated = model.generate(**inputs, max_new_tokens=64)",
        'print(processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])',
    ]
    return "\n".join(lines)


def render_model_card(
    repo_id: str,
    component_models: Mapping[str, str],
    modalities: Sequence[str],
    *,
    training_recipe: Mapping[str, Any] | None = None,
    eval_results: Sequence[Mapping[str, Any]] = (),
    datasets: Sequence[str] = (),
    license: str = "apache-2.0",
    language: str | Sequence[str] | None = None,
    tags: Sequence[str] = (),
    summary: str | None = None,
    adapter_base_model: str | None = None,
) -> ModelCard:
    """Render our card template into a `huggingface_hub.ModelCard` whose metadata the Hub accepts.

    Args:
        repo_id: where the checkpoint lives on the Hub (used for the title and the usage snippet).
        component_models: role -> Hub model id, e.g. {"language model": "HuggingFaceTB/SmolLM2-135M",
            "vision encoder": "google/siglip-base-patch16-224"}; becomes the `base_model` list.
        modalities: the media the model takes besides text: any of "image", "audio", "video".
        training_recipe: the recipe the run used (rendered as YAML).
        eval_results: one dict per result: `dataset` (Hub id), `metric` + `value` or `metrics` {name: value},
            optional `split`, `dataset_name`, `task`; becomes `model-index` and a results table.
        datasets: Hub ids of the training datasets.
        adapter_base_model: for a LoRA adapter repo, the model the adapter applies to (its `base_model`).
    """
    unknown = [m for m in modalities if m not in MODALITY_ROWS]
    if unknown:
        raise ValueError(f"Unknown modalities {unknown}; expected some of {sorted(MODALITY_ROWS)}")
    base_models = [adapter_base_model] if adapter_base_model else list(component_models.values())
    bad_ids = [m for m in [*base_models, *datasets] if not REPO_ID_PATTERN.match(m)]
    if bad_ids:
        raise ValueError(f"Not Hub repo ids (owner/name): {bad_ids}; the card's base_model and datasets need Hub ids")
    rows = _eval_rows(eval_results)
    model_name = repo_id.split("/")[-1]
    card_tags = ["modeling-multimodal", "multimodal", *(MODALITY_TAGS[m] for m in modalities), *tags]
    if adapter_base_model:
        card_tags += ["lora", "peft"]
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="peft" if adapter_base_model else "transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_models or None,
        datasets=list(datasets) or None,
        tags=card_tags,
        model_name=model_name if rows else None,
        eval_results=[
            EvalResult(
                task_type=row["task"],
                dataset_type=row["dataset"],
                dataset_name=row["dataset_name"],
                dataset_split=row["split"] or None,
                metric_type=row["metric"],
                metric_value=row["value"],
            )
            for row in rows
        ]
        or None,
    )
    inputs = [
        {"modality": "text", "placeholder": "(none)", "given_as": "string or chat messages", "tensor": "`input_ids`", "features": None}
    ]
    for modality in modalities:
        placeholder, given_as, tensor, features = MODALITY_ROWS[modality]
        inputs.append({"modality": modality, "placeholder": placeholder, "given_as": given_as, "tensor": tensor, "features": features})
    default_summary = (
        f"A multimodal model built with modeling-multimodal: "
        f"{', '.join(['text', *modalities])} in, text out."
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        summary=summary or default_summary,
        components=list(component_models.items()),
        inputs=inputs,
        usage_snippet=_usage_snippet(repo_id, modalities, adapter_base_model),
        training_recipe_yaml=yaml.safe_dump(dict(training_recipe), sort_keys=False) if training_recipe else "",
        datasets=list(datasets),
        eval_rows=rows,
        license=license,
        adapter_base_model=adapter_base_model,
        remote_code_requirements=REMOTE_CODE_REQUIREMENTS,
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))  # optional template blocks leave blank-line runs


def write_model_card_inputs(checkpoint_dir: str | Path, **card_kwargs: Any) -> Path:
    """Save `render_model_card`'s keyword arguments (minus `repo_id`) with a checkpoint, checked by rendering them once."""
    render_model_card(repo_id="owner/checkpoint", **card_kwargs)  # fail at save time, not at push time
    path = Path(checkpoint_dir) / CARD_INPUTS_FILENAME
    path.write_text(json.dumps(card_kwargs, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


# Hub task ids of the trainer's evaluation tasks (retrieval recall is always feature-extraction).
TASK_BY_EVAL_TASK = {
    "image_caption": "image-to-text",
    "video_caption": "video-text-to-text",
    "speech_transcription": "automatic-speech-recognition",
    "image_text_pair": "feature-extraction",
    "chat": "image-text-to-text",
}
COMPONENT_ROLES = {"text": "language model", "vision": "vision encoder", "audio": "audio encoder"}


def _hub_id(source: str | None) -> str | None:
    """`source` if it names a Hub repo (owner/name) rather than a local folder, else None."""
    if not source or Path(source).expanduser().exists() or not REPO_ID_PATTERN.match(source) or "/" not in source:
        return None
    return source


def modalities_of_config(config: Mapping[str, Any]) -> list[str]:
    """The media a `MultimodalConfig` (as a dict) takes: image and video need the vision tower, audio its tower."""
    modalities = ["image"] if config.get("vision_config") and config.get("image_token_id") is not None else []
    if config.get("audio_config") and config.get("audio_token_id") is not None:
        modalities.append("audio")
    if config.get("vision_config") and config.get("video_token_id") is not None:
        modalities.append("video")
    return modalities


def training_card_inputs(
    recipe: Mapping[str, Any], config: Mapping[str, Any], scores: Mapping[str, float]
) -> dict[str, Any]:
    """`render_model_card` keyword arguments (minus `repo_id`) for a trainer's final checkpoint.

    Args:
        recipe: `TrainingRecipe.to_dict()`.
        config: the model's config as a dict (`config.to_dict()`), for the modalities.
        scores: the final evaluation, `{"<task>/<metric>": value}` as `Trainer.evaluate` returns them.

    Components are the recipe's pretrained parts (and the checkpoint it started from) that are Hub ids; local
    folders are left out (the card's `base_model` must name Hub repos). Each eval manifest becomes one result
    group named after its file (`image_validation.jsonl` -> dataset `image_validation`); training manifests
    are not Hub datasets, so the card's `datasets` stays empty and the recipe (rendered in full) names them.
    """
    model_spec = recipe.get("model") or {}
    components = {
        COMPONENT_ROLES.get(role, role): hub_id
        for role, source in (model_spec.get("components") or {}).items()
        if (hub_id := _hub_id(source if isinstance(source, str) else None))
    }
    starts = {"base checkpoint": model_spec.get("checkpoint"), "initialised from": recipe.get("init_from")}
    for role, source in starts.items():
        if hub_id := _hub_id(source):
            components[role] = hub_id
    results = []
    for entry in (recipe.get("data") or {}).get("eval") or []:
        task = entry.get("task") or "chat"
        metrics = {
            key.split("/", 1)[1]: value
            for key, value in scores.items()
            if key.startswith(f"{task}/") and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        dataset = re.sub(r"[^\w.-]+", "-", Path(entry["manifest"]).stem).strip("-.") or "eval"
        for metric, value in metrics.items():
            hub_task = "feature-extraction" if "recall" in metric else TASK_BY_EVAL_TASK.get(task, "image-text-to-text")
            results.append(
                {"task": hub_task, "dataset": dataset, "dataset_name": f"{entry['manifest']} ({task})",
                 "metric": metric, "value": float(value)}
            )  # fmt: skip
    return {
        "component_models": components,
        "modalities": modalities_of_config(config),
        "training_recipe": json.loads(json.dumps(recipe, default=str)),
        "eval_results": results,
        "tags": [f"stage-{recipe['stage']}"] if recipe.get("stage") else [],
    }


def model_card_for_checkpoint(checkpoint_dir: str | Path, repo_id: str) -> ModelCard:
    """The card for a checkpoint folder: from its `model_card_inputs.json`, else from its config files."""
    checkpoint_dir = Path(checkpoint_dir)
    inputs_path = checkpoint_dir / CARD_INPUTS_FILENAME
    if inputs_path.is_file():
        card_kwargs = json.loads(inputs_path.read_text(encoding="utf-8"))
        return render_model_card(repo_id, **card_kwargs)
    logger.warning(f"{inputs_path} not found: the model card will lack components, training recipe and results")
    adapter_base_model = None
    if (checkpoint_dir / "adapter_config.json").is_file():
        adapter_config = json.loads((checkpoint_dir / "adapter_config.json").read_text(encoding="utf-8"))
        base = adapter_config.get("base_model_name_or_path") or ""
        adapter_base_model = base if REPO_ID_PATTERN.match(base) else None
    config = _read_json(checkpoint_dir / "config.json") or {}
    modalities = modalities_of_config(config) if carries_our_model(checkpoint_dir) else []
    return render_model_card(repo_id, {}, modalities, adapter_base_model=adapter_base_model)


# ---------------------------------------------------------------------------------------------------
# Custom code that travels with a checkpoint
# ---------------------------------------------------------------------------------------------------
AUTO_MAP = {
    "AutoConfig": "configuration_multimodal.MultimodalConfig",
    "AutoModel": "modeling_multimodal.MultimodalModel",
    "AutoModelForImageTextToText": "modeling_multimodal.MultimodalForConditionalGeneration",
}
# processor_config.json: the processor's own entry at the top level and, in each nested component dict (where
# transformers 5.x reads a component's config from), the component's Auto class. AutoVideoProcessor is a
# torchvision-gated placeholder in transformers 5.24; its entry is for versions that have it.
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_multimodal.MultimodalProcessor"}
COMPONENT_AUTO_MAPS = {
    "image_processor": {"AutoImageProcessor": "image_processing_multimodal.MultimodalImageProcessor"},
    "video_processor": {"AutoVideoProcessor": "video_processing_multimodal.MultimodalVideoProcessor"},
}
PROCESSOR_CONFIG = "processor_config.json"
# Flat file stem -> the package module it is cut from; every `auto_map` value above names one of these.
CODE_ROOTS = {
    "configuration_multimodal": "modeling_multimodal.configuration.configuration_multimodal",
    "modeling_multimodal": "modeling_multimodal.modeling_multimodal",
    "processing_multimodal": "modeling_multimodal.processing.processing_multimodal",
    "image_processing_multimodal": "modeling_multimodal.processing.image_processing_multimodal",
    "video_processing_multimodal": "modeling_multimodal.processing.video_processing_multimodal",
}
MODEL_CODE_ROOTS = ("configuration_multimodal", "modeling_multimodal")
PROCESSOR_CODE_ROOTS = ("processing_multimodal", "image_processing_multimodal", "video_processing_multimodal")
# Third-party modules the flattened code imports at top level. transformers refuses remote code whose imports
# are not installed on the loading machine, so the card names them.
REMOTE_CODE_REQUIREMENTS = ("torch", "transformers", "numpy", "pillow", "av", "soundfile")


def _flat_source(module_name: str) -> tuple[str, list[str]]:
    """A module's source with every package-relative import rewritten to `from .<sibling file> import name`.

    transformers copies a remote-code file's `from .sibling import X` siblings and nothing else, so each
    name is imported from the module that defines it. Returns the source and the modules it imports.
    """
    module = importlib.import_module(module_name)
    source = Path(module.__file__).read_text(encoding="utf-8")
    lines, needed = source.splitlines(keepends=True), []
    imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.level > 0]
    for node in sorted(imports, key=lambda n: n.lineno, reverse=True):  # bottom-up keeps line numbers valid
        target = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
        by_module: dict[str, list[str]] = {}
        for alias in node.names:
            value = getattr(importlib.import_module(target), alias.name)
            defining = getattr(value, "__module__", None) if isinstance(value, type) or callable(value) else None
            if defining is None or not defining.startswith("modeling_multimodal"):
                defining = target  # constants: the module we import them from
            if Path(importlib.import_module(defining).__file__).name == "__init__.py":
                raise ValueError(f"{module_name} imports {alias.name} from package {defining}; import it from its module")
            by_module.setdefault(defining, []).append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
        needed.extend(by_module)
        rewritten = [f"from .{m.rsplit('.', 1)[-1]} import {', '.join(names)}\n" for m, names in by_module.items()]
        indent = lines[node.lineno - 1][: node.col_offset]
        lines[node.lineno - 1 : node.end_lineno] = [indent + line for line in rewritten]
    return "".join(lines), needed


def custom_code_files(model: bool = True, processor: bool = False) -> dict[str, str]:
    """File name -> flattened source of the model code (configuration + modeling) and/or the processor code
    (processor, image and video processors), with everything they import from the package."""
    roots = [*(MODEL_CODE_ROOTS if model else ()), *(PROCESSOR_CODE_ROOTS if processor else ())]
    pending, written = [CODE_ROOTS[root] for root in roots], {}
    while pending:  # the closure of relative imports, each module once
        module_name = pending.pop()
        file_name = module_name.rsplit(".", 1)[-1] + ".py"
        if file_name in written:
            if written[file_name][0] != module_name:
                raise ValueError(f"Two modules flatten to {file_name}: {written[file_name][0]} and {module_name}")
            continue
        source, needed = _flat_source(module_name)
        written[file_name] = (module_name, source)
        pending.extend(needed)
    return {file_name: source for file_name, (_, source) in sorted(written.items())}


def config_with_auto_map(config: dict) -> dict:
    return {**config, "auto_map": {**config.get("auto_map", {}), **AUTO_MAP}}


def processor_config_with_auto_map(processor_config: dict) -> dict:
    """`processor_config.json` with the processor's and its components' `auto_map` entries."""
    updated = {**processor_config, "auto_map": {**processor_config.get("auto_map", {}), **PROCESSOR_AUTO_MAP}}
    for component, auto_map in COMPONENT_AUTO_MAPS.items():
        if isinstance(updated.get(component), dict):
            updated[component] = {
                **updated[component], "auto_map": {**updated[component].get("auto_map", {}), **auto_map}
            }  # fmt: skip
    return updated


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def carries_our_model(checkpoint_dir: str | Path) -> bool:
    """Whether a checkpoint folder holds a MultimodalConfig model (whose code must travel with it)."""
    from .configuration import MultimodalConfig

    config = _read_json(Path(checkpoint_dir) / "config.json")
    return config is not None and config.get("model_type") == MultimodalConfig.model_type


def carries_our_processor(checkpoint_dir: str | Path) -> bool:
    """Whether a checkpoint folder holds a saved MultimodalProcessor (whose code must travel with it)."""
    from .processing.processing_multimodal import MultimodalProcessor

    processor_config = _read_json(Path(checkpoint_dir) / PROCESSOR_CONFIG)
    return processor_config is not None and processor_config.get("processor_class") == MultimodalProcessor.__name__


def _dump(values: dict) -> str:
    return json.dumps(values, indent=2, sort_keys=True) + "\n"


def custom_code_for_checkpoint(checkpoint_dir: str | Path) -> dict[str, str]:
    """What makes a saved folder load without modeling-multimodal: repo path -> text of the flattened code files
    and of `config.json` / `processor_config.json` with `auto_map`, for the model and the processor it holds.
    Empty for folders that hold neither (a LoRA adapter, another architecture)."""
    checkpoint_dir = Path(checkpoint_dir)
    model, processor = carries_our_model(checkpoint_dir), carries_our_processor(checkpoint_dir)
    if not (model or processor):
        return {}
    files = custom_code_files(model=model, processor=processor)
    if model:
        files["config.json"] = _dump(config_with_auto_map(_read_json(checkpoint_dir / "config.json")))
    if processor:
        processor_config = processor_config_with_auto_map(_read_json(checkpoint_dir / PROCESSOR_CONFIG))
        files[PROCESSOR_CONFIG] = _dump(processor_config)
    return files


def save_custom_code(save_directory: str | Path) -> list[str]:
    """Make a folder saved with `save_pretrained` load where modeling-multimodal is not installed.

    Writes the model's and the processor's code (whichever the folder holds) as flat sibling files and points
    `auto_map` at them (`config.json`; `processor_config.json` and its image/video processor entries), so
    `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)` and
    `AutoProcessor.from_pretrained(path, trust_remote_code=True)` work without the package. Where the package is
    installed, its registered classes still take precedence. Idempotent; `push_checkpoint` does the same in its
    commit without touching the folder. Returns the files written.
    """
    save_directory = Path(save_directory)
    files = custom_code_for_checkpoint(save_directory)
    if not files:
        raise ValueError(f"{save_directory} holds neither a MultimodalConfig model nor a MultimodalProcessor")
    for file_name, text in files.items():
        (save_directory / file_name).write_text(text, encoding="utf-8")
    return sorted(files)


@contextmanager
def code_saved_flat(obj: Any, save_directory: str | Path, is_main_process: bool = True) -> Iterator[None]:
    """Around `save_pretrained` of a class registered with `register_for_auto_class` (the package registers its
    config, models and processor on import): the folder gets the flattened code and `auto_map` (`save_custom_code`)
    instead of transformers' copy of our modules as they are, whose package-relative imports (`from .configuration
    import ...`) do not resolve in a flat folder. Unregistered objects save as usual."""
    registered = [cls for cls in (type(obj), type(getattr(obj, "config", None))) if cls.__dict__.get("_auto_class")]
    auto_classes = {cls: cls._auto_class for cls in registered}
    for cls in registered:  # transformers copies module files only for classes with an _auto_class
        cls._auto_class = None
    try:
        yield
    finally:
        for cls, auto_class in auto_classes.items():
            cls._auto_class = auto_class
    if type(obj) in auto_classes and is_main_process:
        save_custom_code(save_directory)


# ---------------------------------------------------------------------------------------------------
# Merged weights
# ---------------------------------------------------------------------------------------------------
def merge_adapter_checkpoint(
    adapter_dir: str | Path, output_dir: str | Path, base_model: str | None = None, token: str | None = None
) -> Path:
    """Fold a LoRA adapter into its base model and save full safetensors weights (plus the adapter folder's other files).

    `base_model` defaults to the adapter's `base_model_name_or_path`; the base loads with the first auto class
    that knows its config (image-text-to-text, then causal LM, then plain).
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} is not a LoRA adapter checkpoint: it has no adapter_config.json")
    base_model = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base_config = AutoConfig.from_pretrained(base_model, token=token)
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM, AutoModel):
        if type(base_config) in auto_class._model_mapping:
            break
    else:
        raise ValueError(f"No auto class knows the config of {base_model} ({type(base_config).__name__})")
    base = auto_class.from_pretrained(base_model, dtype="auto", token=token)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(output_dir)
    for path in adapter_dir.rglob("*"):  # tokenizer, processor, card inputs ...: everything but the adapter itself
        relative = path.relative_to(adapter_dir).as_posix()
        if path.is_file() and not relative.startswith("adapter_") and not (output_dir / relative).exists():
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in IGNORE_PATTERNS):
                (output_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, output_dir / relative)
    inputs_path = output_dir / CARD_INPUTS_FILENAME
    if inputs_path.is_file():  # the merged checkpoint is a full model: its card is no adapter card
        card_kwargs = json.loads(inputs_path.read_text(encoding="utf-8"))
        if card_kwargs.pop("adapter_base_model", None):
            card_kwargs["tags"] = [*card_kwargs.get("tags", []), "lora-merged"]
        inputs_path.write_text(json.dumps(card_kwargs, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return output_dir


# ---------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------
def checkpoint_files(checkpoint_dir: str | Path) -> list[str]:
    """Repo paths of the files a push uploads; raises if a weight file is a pickle (safetensors only)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted(
        path.relative_to(checkpoint_dir).as_posix()
        for path in checkpoint_dir.rglob("*")
        if path.is_file()
        and not any(fnmatch.fnmatch(path.relative_to(checkpoint_dir).as_posix(), p) for p in IGNORE_PATTERNS)
    )
    real_root = os.path.realpath(checkpoint_dir)
    leaving = [
        f"{name} -> {target}"
        for name in files
        for target in [os.path.realpath(checkpoint_dir / name)]
        if os.path.commonpath([real_root, target]) != real_root
    ]
    if leaving:
        raise ValueError(
            f"{checkpoint_dir} holds symlinks to files outside it ({', '.join(leaving)}); a push uploads only the "
            "folder's own files: copy them in or remove the links"
        )
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{checkpoint_dir} holds pickled weights {pickles}; save with safetensors before pushing")
    if "config.json" not in files and "adapter_config.json" not in files:
        raise ValueError(f"{checkpoint_dir} is not a checkpoint: it has neither config.json nor adapter_config.json")
    return files


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def weight_files(checkpoint_dir: str | Path) -> list[str]:
    """The folder's full-model weight files: `model.safetensors`, or the index and the shards it names."""
    checkpoint_dir = Path(checkpoint_dir)
    index = _read_json(checkpoint_dir / WEIGHTS_INDEX_NAME)
    if index is not None:
        return [WEIGHTS_INDEX_NAME, *sorted(set(index["weight_map"].values()))]
    return [WEIGHTS_NAME] if (checkpoint_dir / WEIGHTS_NAME).is_file() else []


def reshard_weights(checkpoint_dir: str | Path, output_dir: str | Path, max_shard_size: int | str) -> list[str]:
    """Write the folder's model weights to `output_dir` as safetensors shards of at most `max_shard_size`
    (`"5GB"`, `"200MB"` or bytes) named like `save_pretrained`'s, with `model.safetensors.index.json` when there
    is more than one shard. Tensors are copied as stored (no model is built). Returns the files written."""
    from huggingface_hub import save_torch_state_dict
    from safetensors import safe_open

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    shards = [name for name in weight_files(checkpoint_dir) if name != WEIGHTS_INDEX_NAME]
    if not shards:
        raise ValueError(f"{checkpoint_dir} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} to shard")
    state_dict, metadata = {}, None
    for name in shards:
        with safe_open(str(checkpoint_dir / name), framework="pt") as weights:
            metadata = metadata or weights.metadata()
            state_dict.update({key: weights.get_tensor(key) for key in weights.keys()})
    output_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state_dict, output_dir, max_shard_size=max_shard_size, metadata=metadata or {"format": "pt"})
    return weight_files(output_dir)


@contextmanager
def hub_request_timeout(seconds: float | None, endpoint: str | None = None):
    """Within the block, every huggingface_hub request waits at most `seconds` to connect, write or get an answer.

    Installs a client factory that sets the timeout on huggingface_hub's shared client (also on the fresh client
    it builds after a connection error), and restores the previous factory on exit. A request that times out or
    cannot connect raises `TimeoutError` / `ConnectionError` naming the endpoint and the request.
    """
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http

    if seconds is None:
        yield
        return
    if not seconds > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {seconds!r}")
    # huggingface_hub has no public getter for the installed factory (a user's own, maybe): read its private global
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def client_with_timeout():
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    where = endpoint or constants.ENDPOINT
    set_client_factory(client_with_timeout)
    try:
        yield
    except httpx2.TimeoutException as err:
        raise TimeoutError(
            f"the Hub at {where} did not answer within {seconds:g} s ({err.request.method} {err.request.url}); "
            "check the endpoint or raise the timeout"
        ) from err
    except httpx2.TransportError as err:
        raise ConnectionError(f"cannot reach the Hub at {where}: {err}") from err
    finally:
        set_client_factory(previous)


def push_checkpoint(
    checkpoint_dir: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    *,
    card: ModelCard | str | None = None,
    merge_adapter: bool = False,
    base_model: str | None = None,
    max_shard_size: int | str | None = None,
    endpoint: str | None = None,
    timeout: float | None = DEFAULT_PUSH_TIMEOUT_S,
) -> CommitInfo:
    """Push a saved checkpoint (model, processor, or LoRA adapter) to `repo_id` as one commit, with our model card.

    Creates the repo (and the `revision` branch, from `main`) if needed. The revision then holds exactly the
    folder's files (stale ones from earlier pushes are deleted) and README.md is `card`, or the card rendered
    from the folder (see `model_card_for_checkpoint`). A folder with a MultimodalConfig model or a
    MultimodalProcessor also gets their flattened code and `auto_map` (`custom_code_for_checkpoint`), so the repo
    loads with `trust_remote_code=True` where modeling-multimodal is not installed. With `merge_adapter=True` an
    adapter checkpoint is folded into `base_model` (default: the adapter's own base) and the full weights are
    pushed instead. With `max_shard_size` (`"2GB"`, `"200MB"` or bytes) the model weights are pushed as shards of
    at most that size plus `model.safetensors.index.json` (the folder is not changed); without it they are pushed
    as saved. Each request waits at most `timeout` seconds (`None`: forever; see `hub_request_timeout`); symlinks
    to files outside the folder are refused. Returns the `CommitInfo`; its `oid` is the new revision's commit sha.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"Checkpoint folder {checkpoint_dir} does not exist")
    files = checkpoint_files(checkpoint_dir)  # checks the folder (symlinks, pickles) before anything is read
    if merge_adapter:
        with tempfile.TemporaryDirectory(prefix="merged-") as merged_dir:
            with hub_request_timeout(timeout, endpoint):  # the base model may come from the Hub
                merge_adapter_checkpoint(checkpoint_dir, merged_dir, base_model=base_model, token=token)
            return push_checkpoint(
                merged_dir, repo_id, revision, private, token, commit_message, card=card,
                max_shard_size=max_shard_size, endpoint=endpoint, timeout=timeout,
            )  # fmt: skip

    if card is None:
        card = model_card_for_checkpoint(checkpoint_dir, repo_id)
    readme = str(card) if isinstance(card, ModelCard) else card
    with hub_request_timeout(timeout, endpoint):
        api = HfApi(endpoint=endpoint, token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        branch = revision or "main"
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        generated = {"README.md": readme.encode("utf-8")}
        # code and auto_map travel with the weights and the processor
        generated |= {name: text.encode("utf-8") for name, text in custom_code_for_checkpoint(checkpoint_dir).items()}
        sources = {path: checkpoint_dir / path for path in files if path not in generated}
        with tempfile.TemporaryDirectory(prefix="shards-") as shard_dir:
            if max_shard_size is not None and weight_files(checkpoint_dir):
                for path in weight_files(checkpoint_dir):
                    sources.pop(path, None)
                resharded = reshard_weights(checkpoint_dir, shard_dir, max_shard_size)
                sources |= {path: Path(shard_dir) / path for path in resharded}
            keep = {*sources, *generated, ".gitattributes"}
            stale = [path for path in api.list_repo_files(repo_id, revision=branch) if path not in keep]
            operations = [CommitOperationDelete(path) for path in stale]
            operations += [CommitOperationAdd(path, str(source)) for path, source in sources.items()]
            operations += [CommitOperationAdd(path, content) for path, content in generated.items()]
            return api.create_commit(repo_id, operations, commit_message=commit_message, revision=branch)
