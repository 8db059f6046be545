"""Code that travels with a checkpoint, so it loads with `trust_remote_code=True` where the package is not installed.

transformers copies a remote-code file's `from .sibling import X` siblings and nothing else, and our modules import
each other through packages (`from ..configuration.media_tokens import ...`). `custom_code_files` therefore
rewrites every package-relative import of the model's and the processor's modules into an import from a flat
sibling file (`_flat_source`, an `ast` pass over the source) and writes the closure of those files; `auto_map`
entries in `config.json` / `processor_config.json` point the Auto classes at them.

This module imports nothing from the package at import time: the model's and the processor's `save_pretrained`
call `code_saved_flat`, and the modules to flatten are read by name.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .folder import read_json


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


def carries_our_model(checkpoint_dir: str | Path) -> bool:
    """Whether a checkpoint folder holds a MultimodalConfig model (whose code must travel with it)."""
    from ..configuration import MultimodalConfig

    config = read_json(Path(checkpoint_dir) / "config.json")
    return config is not None and config.get("model_type") == MultimodalConfig.model_type


def carries_our_processor(checkpoint_dir: str | Path) -> bool:
    """Whether a checkpoint folder holds a saved MultimodalProcessor (whose code must travel with it)."""
    from ..processing.processing_multimodal import MultimodalProcessor

    processor_config = read_json(Path(checkpoint_dir) / PROCESSOR_CONFIG)
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
        files["config.json"] = _dump(config_with_auto_map(read_json(checkpoint_dir / "config.json")))
    if processor:
        processor_config = processor_config_with_auto_map(read_json(checkpoint_dir / PROCESSOR_CONFIG))
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
