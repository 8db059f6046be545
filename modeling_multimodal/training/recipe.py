"""Training recipes: a YAML file, overridable from the command line with dotted `key=value` pairs.

A recipe names the model (a saved checkpoint, components to compose, or a config to build from
scratch), the data, the stage and the hyper-parameters. Every value is checked where the recipe is
read, naming its key: types (YAML's `1e-3` is a number here, as in YAML 1.2), ranges (no negative
learning rate, `max_grad_norm` > 0 or null to switch clipping off), and unknown keys at every level,
`model.config` and its sub-configs included, so a typo never silently falls back to a default. A
recipe file is at most 1 MiB and 100k values once YAML aliases are expanded (an alias bomb is refused).

Paths: relative `data.root`, `init_from`, `model.checkpoint` and `model.components` paths in a YAML file
(a chained stage's own ones too) resolve against the file's folder; a `model.checkpoint` / `init_from` /
component that is not a folder there is left as given (a Hub id). `output_dir` resolves against the
current directory, like any command's output option, so one recipe in a shared (or installed,
read-only) folder serves many runs. Overrides on the command line are taken as typed (current directory).

Keys a reader may not guess:
- `threads`: torch intra-op threads per process; default `OMP_NUM_THREADS` when set, else the cores
  this process may run on (`os.sched_getaffinity`) divided by the processes on this machine
  (`LOCAL_WORLD_SIZE`). The `--threads` flag of `train`, `evaluate` and `demo` overrides it
  (`modeling_multimodal/threads.py`).
- `stages`: chain stages in one run, e.g. `[align, finetune]` or
  `[{stage: align, optim.max_steps: 40}, {stage: finetune, lora.r: 16}]` (dotted overrides per stage).
  Stage n trains in `output_dir/<n>-<stage>/` (n from 1), initialised from stage n-1's `final/`; with
  `resume`, finished stages are skipped and an interrupted one resumes from its checkpoint.
- `overwrite_output_dir`: start afresh in a folder that holds another run's checkpoints (otherwise refused).
- `augment`: training-time augmentation that keeps the text true, every transform off by default
  (`AugmentSpec`, docs/AUGMENTATION.md); `lora.quantize: 4bit`: QLoRA on a CUDA GPU (docs/COMPRESSION.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..configuration.configuration_multimodal import DEPRECATED_NAMES

STAGES = ("encoders", "align", "finetune", "full")
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000  # after YAML aliases are expanded
PATH_KEYS = ("data.root", "model.checkpoint", "model.components.text", "model.components.vision", "model.components.audio")


# --- value checks (each names the key) ------------------------------------------------------------------
def check_number(
    key: str, value, *, integer: bool = False, minimum=None, maximum=None, above=None, below=None, optional: bool = False
):
    """An int (or float) within range; ints are accepted for floats, integral floats (`1e3`) for ints."""
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{key}={value!r}: expected {kind}{' or null' if optional else ''}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{key}={value!r}: expected an integer")
        value = int(value)
    else:
        value = float(value)
    bounds = (
        (minimum, lambda b: value < b, ">="), (maximum, lambda b: value > b, "<="),
        (above, lambda b: value <= b, ">"), (below, lambda b: value >= b, "<"),
    )
    for bound, fails, words in bounds:
        if bound is not None and fails(bound):
            raise ValueError(f"{key}={value!r}: must be {words} {bound}")
    return value


def check_flag(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: expected true or false")
    return value


def check_text(key: str, value, *, optional: bool = False, choices=None):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}={value!r}: expected a non-empty string{' or null' if optional else ''}")
    if choices is not None and value not in choices:
        raise ValueError(f"{key}={value!r}; expected one of {tuple(choices)}")
    return value


def check_keys(key: str, values, known, required=()) -> dict:
    if not isinstance(values, dict):
        raise ValueError(f"{key}={values!r}: expected a mapping")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"Unknown recipe key(s) {unknown} in {key}; known: {sorted(known)}")
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"{key}: missing required key(s) {missing}")
    return values


def _config_fields(config_class) -> set[str]:
    fields = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    return fields | set(getattr(config_class, "attribute_map", {})) | {"model_type"}


def check_model_config(key: str, values) -> dict:
    """MultimodalConfig keys (and each sub-config's keys for its model type); values are checked by the configs."""
    from transformers import CONFIG_MAPPING, PreTrainedConfig

    from ..configuration import MultimodalConfig

    check_keys(key, values, _config_fields(MultimodalConfig) | _config_fields(PreTrainedConfig))
    for name, spec in MultimodalConfig.sub_configs_defaults.items():
        sub = values.get(name)
        if sub is None or not isinstance(sub, dict):
            continue
        model_type = sub.get("model_type", spec.model_type)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"{key}.{name}.model_type={model_type!r}: not a model type transformers knows")
        check_keys(f"{key}.{name}", sub, _config_fields(CONFIG_MAPPING[model_type]) | _config_fields(PreTrainedConfig))
    return values


def check_data_entries(key: str, entries, training: bool) -> list:
    """[{manifest, task, max_samples, repeat}]: `repeat` weights a training task; evaluation scores each row once."""
    if not isinstance(entries, list):
        raise ValueError(f"{key}={entries!r}: expected a list of {{manifest, task}} entries")
    from ..data.formats import FORMATS

    allowed = {"manifest", "task", "max_samples", "format", "media_root", "split"} | ({"repeat"} if training else set())
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict) or set(entry) - allowed or "manifest" not in entry:
            optional = "format, media_root, split, max_samples" + (", repeat" if training else "; repeat is for data.train only")
            raise ValueError(f"data entry {entry} ({where}): expected keys manifest, task (optional {optional})")
        if not _in_memory(entry["manifest"]):
            check_text(f"{where}.manifest", entry["manifest"])
        check_text(f"{where}.task", entry.get("task"), optional=True)
        check_text(f"{where}.format", entry.get("format"), optional=True, choices=FORMATS)
        check_text(f"{where}.media_root", entry.get("media_root"), optional=True)
        check_text(f"{where}.split", entry.get("split"), optional=True)
        check_number(f"{where}.max_samples", entry.get("max_samples"), integer=True, minimum=1, optional=True)
        repeat = entry.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"data entry {entry} ({where}): repeat must be an integer >= 1 (times its rows appear per epoch), got {repeat!r}")
    return entries


def _in_memory(manifest) -> bool:
    """A `datasets.Dataset` / `DatasetDict` handed to the recipe in Python (a data entry's `manifest`)."""
    import datasets

    return isinstance(manifest, (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict))


def _described(entries: list) -> list:
    """Data entries with in-memory manifests written as a description (what a saved recipe can hold)."""
    def describe(manifest):
        if not _in_memory(manifest):
            return manifest
        rows = getattr(manifest, "num_rows", None)
        rows = sum(rows.values()) if isinstance(rows, dict) else rows
        return f"<in-memory {type(manifest).__name__}: {'streamed' if rows is None else rows} rows>"

    return [{**entry, "manifest": describe(entry["manifest"])} for entry in entries]


# --- the recipe ---------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    checkpoint: str | None = None  # a saved MultimodalForConditionalGeneration (+ processor)
    components: dict | None = None  # {"text": ..., "vision": ..., "audio": ...} pretrained parts
    config: dict | None = None  # MultimodalConfig kwargs for a model from scratch
    tokenizer: dict | None = None  # from scratch: {"kind": "word"|"bpe", "vocab_size": N} trained on the data's text
    image_size: int | None = None  # from scratch: image processor size (defaults to the vision tower's)
    overrides: dict = field(default_factory=dict)  # MultimodalConfig overrides for checkpoint/components

    def __post_init__(self):
        import inspect

        from ..configuration import MultimodalConfig
        from ..composition import from_pretrained_components

        check_text("model.checkpoint", self.checkpoint, optional=True)
        if self.components is not None:
            parameters = inspect.signature(from_pretrained_components).parameters
            known = {n for n, p in parameters.items() if n != "cls" and p.kind is not p.VAR_KEYWORD}
            if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                known |= _config_fields(MultimodalConfig)
            check_keys("model.components", self.components, known, required=("text",))
            for part in ("text", "vision", "audio"):
                check_text(f"model.components.{part}", self.components.get(part), optional=part != "text")
        if self.config is not None:
            check_model_config("model.config", self.config)
        if self.tokenizer is not None:
            check_keys("model.tokenizer", self.tokenizer, {"kind", "vocab_size", "media_tokens"})
            check_text("model.tokenizer.kind", self.tokenizer.get("kind", "word"), choices=("word", "bpe"))
            check_number("model.tokenizer.vocab_size", self.tokenizer.get("vocab_size", 1000), integer=True, minimum=1)
            check_flag("model.tokenizer.media_tokens", self.tokenizer.get("media_tokens", True))
        self.image_size = check_number("model.image_size", self.image_size, integer=True, minimum=1, optional=True)
        check_model_config("model.overrides", self.overrides)


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
    image_folder: str | None = None  # chat media paths (LLaVA's `image`) are relative to it (relative: to root)
    media_roots: list = field(default_factory=list)  # further folders media may come from (absolute paths inside)
    assistant_turns: str = "all"  # chat rows: "all" assistant replies trained (LLaVA / LLaMA-Factory), or "last"
    eval_max_samples: int | None = 64
    streaming: bool = False  # read training rows as they are needed (training/streaming.py); also for IterableDatasets
    shuffle_buffer: int = 1000  # streaming: rows in each task's shuffle buffer

    def __post_init__(self):
        check_text("data.root", self.root)
        check_data_entries("data.train", self.train, training=True)
        check_data_entries("data.eval", self.eval, training=False)
        self.max_length = check_number("data.max_length", self.max_length, integer=True, minimum=1)
        self.num_workers = check_number("data.num_workers", self.num_workers, integer=True, minimum=0)
        self.eval_max_samples = check_number("data.eval_max_samples", self.eval_max_samples, integer=True, minimum=1, optional=True)
        check_text("data.image_folder", self.image_folder, optional=True)
        if not isinstance(self.media_roots, list):
            raise ValueError(f"data.media_roots={self.media_roots!r}: expected a list of folders")
        for index, folder in enumerate(self.media_roots):
            check_text(f"data.media_roots[{index}]", folder)
        check_text("data.assistant_turns", self.assistant_turns, choices=("all", "last"))
        for name in ("packing", "group_by_length", "cache_in_memory", "streaming"):
            check_flag(f"data.{name}", getattr(self, name))
        self.shuffle_buffer = check_number("data.shuffle_buffer", self.shuffle_buffer, integer=True, minimum=1)
        if self.cache_in_memory and self.streams():
            raise ValueError("data.cache_in_memory keeps every example of an indexed data set; streamed data (data.streaming) is read once per pass")
        if self.cache_in_memory and self.num_workers:
            raise ValueError("data.cache_in_memory needs data.num_workers=0 (each worker would keep its own copy)")


    def streams(self) -> bool:
        """Whether the training rows are streamed: `streaming` is set, or a manifest is an `IterableDataset`."""
        import datasets

        return self.streaming or any(isinstance(e["manifest"], (datasets.IterableDataset, datasets.IterableDatasetDict)) for e in self.train)


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | None = None  # a regex over module names; default: every Linear of the LM
    encoders: bool = False  # also LoRA on the vision / audio towers' Linear layers
    quantize: str | None = None  # "4bit": QLoRA, the LM's Linear layers in NF4 (bitsandbytes; a CUDA GPU needed)

    def __post_init__(self):
        self.r = check_number("lora.r", self.r, integer=True, minimum=1)
        self.alpha = check_number("lora.alpha", self.alpha, above=0)
        self.dropout = check_number("lora.dropout", self.dropout, minimum=0, below=1)
        if check_text("lora.target_modules", self.target_modules, optional=True) is not None:
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(f"lora.target_modules={self.target_modules!r}: not a valid regex ({error})") from None
        check_flag("lora.encoders", self.encoders)
        check_text("lora.quantize", self.quantize, optional=True, choices=("4bit",))


@dataclass
class AugmentSpec:
    """Training-time augmentation (`training/augmentation.py`, docs/AUGMENTATION.md); every transform is off by default."""

    hflip: float = 0.0  # probability of a horizontal flip; the text is rewritten through flip_word_swaps
    rotation: float = 0.0  # a rotation drawn uniformly in [-rotation, rotation] degrees (at most MAX_ROTATION)
    crop_scale: float | None = None  # random resized crop: its area drawn in [crop_scale, 1] of the image; null: none
    colour_jitter: float = 0.0  # brightness, contrast and saturation factors drawn in [1 - s, 1 + s]
    time_masks: int = 0  # SpecAugment: masks over time on the log-mel, each up to time_mask_frames wide
    time_mask_frames: int = 0
    freq_masks: int = 0  # and over mel bins, each up to freq_mask_bins wide
    freq_mask_bins: int = 0
    speed: list | None = None  # [low, high]: speed perturbation factor drawn per clip (e.g. [0.9, 1.1]); null: none
    flip_word_swaps: dict | None = None  # the words a mirror image swaps, e.g. {left: right, right: left}
    text_attributes: dict = field(default_factory=dict)  # task -> what its text names: colour, position, size, subject

    def __post_init__(self):
        from .augmentation import DISABLED_BY, MAX_ROTATION

        self.hflip = check_number("augment.hflip", self.hflip, minimum=0, maximum=1)
        self.rotation = check_number("augment.rotation", self.rotation, minimum=0, maximum=MAX_ROTATION)
        self.crop_scale = check_number("augment.crop_scale", self.crop_scale, above=0, maximum=1, optional=True)
        self.colour_jitter = check_number("augment.colour_jitter", self.colour_jitter, minimum=0, below=1)
        for masks, width in (("time_masks", "time_mask_frames"), ("freq_masks", "freq_mask_bins")):
            for name in (masks, width):
                setattr(self, name, check_number(f"augment.{name}", getattr(self, name), integer=True, minimum=0))
            if getattr(self, masks) and not getattr(self, width):
                raise ValueError(f"augment.{masks}={getattr(self, masks)} needs augment.{width} > 0 (the widest mask)")
        if self.speed is not None:
            if not isinstance(self.speed, list) or len(self.speed) != 2:
                raise ValueError(f"augment.speed={self.speed!r}: expected [low, high] speed factors, e.g. [0.9, 1.1], or null")
            low, high = (check_number("augment.speed", value, minimum=0.5, maximum=2) for value in self.speed)
            if low > high:
                raise ValueError(f"augment.speed={self.speed!r}: expected [low, high] with low <= high")
            self.speed = [low, high]
        if self.flip_word_swaps is not None:
            if not isinstance(self.flip_word_swaps, dict):
                raise ValueError(f"augment.flip_word_swaps={self.flip_word_swaps!r}: expected a mapping of word: partner")
            for word, partner in self.flip_word_swaps.items():
                check_text(f"augment.flip_word_swaps.{word}", partner)
                if self.flip_word_swaps.get(partner) != word:
                    raise ValueError(
                        f"augment.flip_word_swaps: {word!r} -> {partner!r} but {partner!r} -> "
                        f"{self.flip_word_swaps.get(partner)!r}; a mirror swaps both ways, list {partner}: {word} too"
                    )
        if self.hflip and self.flip_word_swaps is None:
            raise ValueError(
                "augment.hflip needs augment.flip_word_swaps: the words a mirror image swaps in the text "
                "(e.g. {left: right, right: left}), or {} when no text names a side"
            )
        if not isinstance(self.text_attributes, dict):
            raise ValueError(f"augment.text_attributes={self.text_attributes!r}: expected a mapping of task: [attributes]")
        for task, attributes in self.text_attributes.items():
            if not isinstance(attributes, list) or set(attributes) - set(DISABLED_BY):
                raise ValueError(
                    f"augment.text_attributes.{task}={attributes!r}: expected a list of {sorted(DISABLED_BY)}"
                )

    @property
    def active(self) -> bool:
        """Whether any transform can change a sample."""
        return bool(self.hflip or self.rotation or self.crop_scale or self.colour_jitter or self.time_masks
                    or self.freq_masks or self.speed)


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
    max_grad_norm: float | None = 1.0  # null: no clipping

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            setattr(self, name, check_number(f"optim.{name}", getattr(self, name), integer=True, minimum=1))
        for name in ("lr_projector", "lr_lora", "lr_encoder", "lr_lm", "weight_decay"):
            setattr(self, name, check_number(f"optim.{name}", getattr(self, name), minimum=0))
        self.warmup_steps = check_number("optim.warmup_steps", self.warmup_steps, integer=True, minimum=0)
        self.max_grad_norm = check_number("optim.max_grad_norm", self.max_grad_norm, above=0, optional=True)


@dataclass
class TrainingRecipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stage: str = "align"
    stages: list | None = None  # chain: [align, finetune] or [{stage: align, optim.max_steps: 40}, ...] (module docstring)
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    auxiliary_loss_weight: float | None = None  # λ; None keeps the model config's value
    contrastive_loss_weight: float | None = None  # α
    contrastive_every_n_steps: int = 1  # L_contrastive on every n-th optimizer step only: its two extra LM passes cost most of a step
    mixed_precision: str = "no"  # "no" | "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    threads: int | None = None  # torch threads per process; None: the cores available / processes on this machine
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
        check_text("stage", self.stage, choices=STAGES)
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` (as in `mixed_precision=no`) as false
            self.mixed_precision = "no"
        check_text("mixed_precision", self.mixed_precision, choices=("no", "bf16"))
        for name in ("auxiliary_loss_weight", "contrastive_loss_weight"):
            setattr(self, name, check_number(name, getattr(self, name), minimum=0, optional=True))
        self.contrastive_every_n_steps = check_number("contrastive_every_n_steps", self.contrastive_every_n_steps, integer=True, minimum=1)
        self.seed = check_number("seed", self.seed, integer=True, minimum=0)
        self.threads = check_number("threads", self.threads, integer=True, minimum=1, optional=True)
        for name in ("save_steps", "eval_steps"):
            setattr(self, name, check_number(name, getattr(self, name), integer=True, minimum=0))
        self.logging_steps = check_number("logging_steps", self.logging_steps, integer=True, minimum=1)
        self.save_total_limit = check_number("save_total_limit", self.save_total_limit, integer=True, minimum=1, optional=True)
        for name in ("gradient_checkpointing", "resume", "overwrite_output_dir", "report", "hub_private"):
            check_flag(name, getattr(self, name))
        check_text("output_dir", self.output_dir)
        for name in ("init_from", "push_to_hub"):
            check_text(name, getattr(self, name), optional=True)
        if self.stages is not None and (not isinstance(self.stages, list) or not self.stages):
            raise ValueError(f"stages={self.stages!r}: expected a non-empty list of stage names or {{stage: name, key: value}}")
        sources = [s for s in ("checkpoint", "components", "config") if getattr(self.model, s) is not None]
        if len(sources) != 1 and self.init_from is None:
            raise ValueError(f"model: give exactly one of checkpoint / components / config (got {sources or 'none'})")
        if not self.data.train:
            raise ValueError("data.train is empty: list at least one {manifest, task}")
        self._check_augment()

    def _check_augment(self):
        """Augmentation against the data section: what it would silently break is refused, naming both keys."""
        augment, data = self.augment, self.data
        tasks = {entry.get("task") or "messages" for entry in data.train}
        unknown = sorted(set(augment.text_attributes) - tasks)
        if unknown:
            raise ValueError(f"augment.text_attributes names task(s) {unknown} that data.train does not train on ({sorted(tasks)})")
        if augment.active and data.cache_in_memory:
            raise ValueError("augment draws new transforms every epoch but data.cache_in_memory keeps each example's first encoding; turn one off")
        if augment.speed is not None and data.packing:
            raise ValueError("augment.speed changes clip lengths, but data.packing plans its rows from the lengths in the files; turn one off")

    def to_dict(self) -> dict:
        """The recipe as plain values (in-memory data sets described, not copied)."""
        kept = self.data.train, self.data.eval
        try:
            self.data.train, self.data.eval = _described(self.data.train), _described(self.data.eval)
            return dataclasses.asdict(self)
        finally:
            self.data.train, self.data.eval = kept


# Old top-level keys -> their current names; recipes with the old keys still load (FutureWarning).
DEPRECATED_KEYS = DEPRECATED_NAMES  # the loss weights' old names: one map, the config's
SECTIONS = {"model": ModelSpec, "data": DataSpec, "lora": LoraSpec, "optim": OptimSpec, "augment": AugmentSpec}


def _build(cls, values: dict, where: str):
    values = dict(check_keys(where or "the recipe", values if values is not None else {}, [f.name for f in dataclasses.fields(cls)]))
    if cls is TrainingRecipe:
        for name, section in SECTIONS.items():
            if name in values:
                values[name] = _build(section, values[name], name)
    return cls(**values)


# --- YAML -----------------------------------------------------------------------------------------------
class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: `1e-3` (no dot) is a number, not the string '1e-3'."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, where: str):
    """Safe YAML with bounded size and alias expansion; a recipe's values as plain, unshared data."""
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise ValueError(f"{where}: {len(text.encode())} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        value = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: not valid YAML ({error})") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply") from None
    budget = [MAX_RECIPE_VALUES]

    def expand(node, depth=0):  # a fresh copy, counting every value an alias repeats
        budget[0] -= 1
        if budget[0] < 0 or depth > 100:
            raise ValueError(
                f"{where}: more than {MAX_RECIPE_VALUES} values (or 100 levels) once YAML aliases are expanded; "
                "a recipe is small (is this an alias bomb?)"
            )
        if isinstance(node, dict):
            return {key: expand(item, depth + 1) for key, item in node.items()}
        if isinstance(node, list):
            return [expand(item, depth + 1) for item in node]
        return node

    return expand(value)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` pairs (values parsed as YAML: numbers, booleans, lists) to a nested dict."""
    values = copy.deepcopy(values)
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"Override {override!r} must look like key.sub=value")
        key, raw = override.split("=", 1)
        set_dotted(values, key, parse_yaml(raw, f"Override {override!r}"), f"Override {override!r}")
    return values


def current_key(key: str, where: str) -> str:
    """`key` under its current name (a deprecated top-level key is renamed, with a FutureWarning)."""
    if key in DEPRECATED_KEYS:
        warnings.warn(f"{where}: recipe key {key} is deprecated, use {DEPRECATED_KEYS[key]}", FutureWarning, stacklevel=4)
        return DEPRECATED_KEYS[key]
    return key


def set_dotted(values: dict, key: str, value, where: str) -> None:
    key = current_key(key, where)
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{where}: {part!r} is not a section")
    node[parts[-1]] = value


# --- paths ----------------------------------------------------------------------------------------------
def resolve_paths(values: dict, base: Path) -> dict:
    """Relative paths of a recipe file made relative to its folder (see the module docstring)."""
    values = copy.deepcopy(values)

    def local(value, always: bool):
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return value
        candidate = base / value
        return str(candidate) if always or candidate.exists() else value

    data, model = values.get("data"), values.get("model")
    if isinstance(data, dict) and "root" in data:
        data["root"] = local(data["root"], always=True)
    if "init_from" in values:
        values["init_from"] = local(values["init_from"], always=False)
    if isinstance(model, dict):
        if "checkpoint" in model:
            model["checkpoint"] = local(model["checkpoint"], always=False)
        if isinstance(model.get("components"), dict):
            for part in ("text", "vision", "audio"):
                if part in model["components"]:
                    model["components"][part] = local(model["components"][part], always=False)
    for entry in values.get("stages") or []:  # a stage's own dotted paths
        if isinstance(entry, dict):
            for key in [k for k in entry if k in PATH_KEYS]:
                entry[key] = local(entry[key], always=key == "data.root")
    return values


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None) -> TrainingRecipe:
    """Read a recipe from YAML (or a dict), apply overrides, validate (every stage of a chain too)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Recipe {path} does not exist")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise ValueError(f"Recipe {path}: {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
        values = parse_yaml(path.read_text(), f"Recipe {path}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"Recipe {path}: expected a mapping of keys, got {type(values).__name__}")
        values = resolve_paths(values, path.resolve().parent)
    if isinstance(values, dict):
        values = {current_key(key, f"Recipe {path}" if path else "the recipe"): value for key, value in values.items()}
    values = apply_overrides(values or {}, list(overrides))
    recipe = _build(TrainingRecipe, values, "")
    stage_recipes(recipe)  # a chain's stages are checked now, not when a stage starts
    return recipe


# --- chained stages -------------------------------------------------------------------------------------
def stage_recipes(recipe: TrainingRecipe) -> list[TrainingRecipe]:
    """The recipe of each stage of `recipe.stages` (or [recipe] itself): see the module docstring."""
    if not recipe.stages:
        return [recipe]
    base = recipe.to_dict()
    base["stages"] = None
    recipes, previous = [], recipe.init_from
    for number, entry in enumerate(recipe.stages, start=1):
        where = f"stages[{number - 1}]"
        if isinstance(entry, str):
            entry = {"stage": entry}
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ValueError(f"{where}={entry!r}: expected a stage name or {{stage: name, key.sub: value, ...}}")
        values = copy.deepcopy(base)
        for key, value in entry.items():
            if key.split(".")[0] in ("stages", "output_dir", "init_from", "resume", "overwrite_output_dir"):
                raise ValueError(f"{where}: {key} is set for the whole chain, not per stage")
            set_dotted(values, key, copy.deepcopy(value), where)
        name = check_text(f"{where}.stage", entry["stage"], choices=STAGES)
        values["output_dir"] = str(Path(recipe.output_dir) / f"{number}-{name}")
        values["init_from"] = None if previous is None else str(previous)
        try:
            recipes.append(_build(TrainingRecipe, values, ""))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        previous = Path(values["output_dir"]) / "final"
    return recipes

