"""Training recipes: a YAML file, overridable from the command line with dotted `key=value` pairs.

A recipe names the model (a saved checkpoint, components to compose, or a config to build from
scratch), the data, the stage and the hyper-parameters. Unknown keys are errors, so a typo in a
recipe or an override never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("encoders", "align", "finetune", "full")


@dataclass
class ModelSpec:
    checkpoint: str | None = None  # a saved MultimodalForConditionalGeneration (+ processor)
    components: dict | None = None  # {"text": ..., "vision": ..., "audio": ...} pretrained parts
    config: dict | None = None  # MultimodalConfig kwargs for a model from scratch
    tokenizer: dict | None = None  # from scratch: {"kind": "word"|"bpe", "vocab_size": N} trained on the data's text
    image_size: int | None = None  # from scratch: image processor size (defaults to the vision tower's)
    overrides: dict = field(default_factory=dict)  # MultimodalConfig overrides for checkpoint/components


@dataclass
class DataSpec:
    root: str = "."
    train: list = field(default_factory=list)  # [{"manifest": path, "task": name, "max_samples": n, "repeat": k}, ...]
    eval: list = field(default_factory=list)
    max_length: int = 1024
    packing: bool = False
    group_by_length: bool = True
    num_workers: int = 0
    cache_in_memory: bool = False  # keep encoded examples after their first use (small data sets, many epochs)
    eval_max_samples: int | None = 64


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | None = None  # a regex over module names; default: every Linear of the LM
    encoders: bool = False  # also LoRA on the vision / audio towers' Linear layers


@dataclass
class OptimSpec:
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    lr_projector: float = 1e-3
    lr_lora: float = 2e-4
    lr_encoder: float = 2e-5
    lr_lm: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0


@dataclass
class TrainingRecipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stage: str = "align"
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    other_loss_weight: float | None = None  # λ; None keeps the model config's value
    cross_loss_weight: float | None = None  # α
    mixed_precision: str = "no"  # "no" | "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "outputs/run"
    save_steps: int = 0  # 0: only the final save
    save_total_limit: int | None = 2
    eval_steps: int = 0
    logging_steps: int = 10
    resume: bool = False  # continue from output_dir's latest checkpoint (an error when there is none)
    overwrite_output_dir: bool = False  # replace another run's checkpoints and outputs in output_dir
    report: bool = True
    init_from: str | None = None  # a previous run's final/ directory: start from its weights (stage chaining)
    push_to_hub: str | None = None  # a Hub repo id: final/ is pushed there (with its card) at the end of training
    hub_private: bool = False  # create that repo private

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}; expected one of {STAGES}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; expected 'no' or 'bf16'")
        sources = [s for s in ("checkpoint", "components", "config") if getattr(self.model, s) is not None]
        if len(sources) != 1 and self.init_from is None:
            raise ValueError(f"model: give exactly one of checkpoint / components / config (got {sources or 'none'})")
        if not self.data.train:
            raise ValueError("data.train is empty: list at least one {manifest, task}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"Unknown recipe key(s) {unknown} in {where or 'the recipe'}; known: {sorted(known)}")
    for name, value in list(values.items()):
        sub = {ModelSpec: "model", DataSpec: "data", LoraSpec: "lora", OptimSpec: "optim"}
        for sub_cls, sub_name in sub.items():
            if name == sub_name and cls is TrainingRecipe:
                values[name] = _build(sub_cls, value, f"{where}.{name}".lstrip("."))
    return cls(**values)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` pairs (values parsed as YAML: numbers, booleans, lists) to a nested dict."""
    values = copy.deepcopy(values)
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"Override {override!r} must look like key.sub=value")
        key, raw = override.split("=", 1)
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {override!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None) -> TrainingRecipe:
    """Read a recipe from YAML (or a dict), apply overrides, validate; relative paths resolve against the YAML's folder."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Recipe {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
    values = apply_overrides(values or {}, list(overrides))
    recipe = _build(TrainingRecipe, values, "")
    return recipe


def recipe_from_dict(values: dict, overrides: list[str] = ()) -> TrainingRecipe:
    return load_recipe(values=values, overrides=overrides)


def describe(recipe: TrainingRecipe) -> dict[str, Any]:
    """The recipe as plain data (for logs, checkpoints and model cards)."""
    return recipe.to_dict()
