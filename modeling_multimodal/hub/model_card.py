"""Our model card: `model_cards/multimodal_model_card.md` rendered with `huggingface_hub.ModelCard.from_template`.

A checkpoint folder carries what its card needs in `model_card_inputs.json`: the keyword arguments of
`render_model_card` (the trainer writes it with `write_model_card_inputs`). Without it the card is rendered from
what `config.json` / `adapter_config.json` tell.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .custom_code import REMOTE_CODE_REQUIREMENTS, carries_our_model
from .folder import CARD_INPUTS_FILENAME, read_json

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "multimodal_model_card.md"
REPO_ID_PATTERN = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")

# Per modality: (placeholder, accepted input, processor output).
MODALITY_ROWS = {
    "image": ("`<image>`", "PIL image, numpy array, path or bytes", "`pixel_values`"),
    "audio": ("`<audio>`", "16 kHz waveform (numpy), path or bytes", "`input_features`"),
    "video": ("`<video>`", "video file path or frames", "`pixel_values_videos`"),
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
        {"modality": "text", "placeholder": "(none)", "given_as": "string or chat messages", "tensor": "`input_ids`"}
    ]
    for modality in modalities:
        placeholder, given_as, tensor = MODALITY_ROWS[modality]
        inputs.append({"modality": modality, "placeholder": placeholder, "given_as": given_as, "tensor": tensor})
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
    config = read_json(checkpoint_dir / "config.json") or {}
    modalities = modalities_of_config(config) if carries_our_model(checkpoint_dir) else []
    return render_model_card(repo_id, {}, modalities, adapter_base_model=adapter_base_model)
