"""The package's imports flow one way: no cycle, and no module imports from a higher layer than its own.

Every import counts, at module level or inside a function (a lazy import does not make a cycle go away),
and so does `importlib.import_module("modeling_multimodal....")` with a literal name. The few edges that go
against the layers on purpose are listed in `EXCEPTIONS`, each with its reason.
"""

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Import name -> folder, as setup.py's `package_dir` installs them.
PACKAGE_DIRS = {
    "modeling_multimodal": "modeling_multimodal",
    "modeling_multimodal.configuration": "configuration",
    "modeling_multimodal.processing": "processing",
    "modeling_multimodal.model_cards": "model_cards",
    "modeling_multimodal.recipes": "recipes",
}
# Lowest first; a module may import from its own layer or any lower one. The first matching prefix decides.
LAYERS = [
    ("foundations", ["constants", "folder_kind", "configuration", "tokenization", "threads", "model_cards", "recipes", "conversion", "demo_data"]),
    ("processing", ["processing"]),
    ("model parts", ["encoders", "part_weights", "input_checks", "projectors", "tiling", "video_frames", "losses", "retrieval", "vision_stem", "composition", "quantized_layers"]),
    ("model", ["modeling_multimodal", ""]),  # modeling_multimodal.py and the package's public API (__init__)
    ("compression", ["compression"]),  # quantizing a built model (inference checkpoints; QLoRA for training)
    ("data", ["data"]),  # manifests, tasks, example encoding, collation: shared by evaluation and training
    ("evaluation", ["evaluation"]),
    ("training and sharing", ["training", "hub"]),
    ("applications", ["demo", "cli", "train", "testing_utils", "integrations"]),  # integrations: other tools run our checkpoints
]
EXCEPTIONS = {
    # save_pretrained writes the flattened code with the packager, imported by name (not part of the flattened code;
    # absent when the model or processor was loaded as remote code).
    ("modeling_multimodal.modeling_multimodal", "modeling_multimodal.hub.custom_code"),
    ("modeling_multimodal.processing.processing_multimodal", "modeling_multimodal.hub.custom_code"),
}


def package_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if not (REPO / folder / Path(*parts[:-1]) / "__init__.py").is_file():
                continue  # not part of a package (the `evaluate` metric scripts, loaded by path)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = package_modules()


def imports_of(name: str, path: Path) -> set[str]:
    """The package modules that `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
        elif isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            targets.add(node.args[0].value)
    return {target for target in targets if target in MODULES and target != name}


GRAPH = {name: imports_of(name, path) - {b for a, b in EXCEPTIONS if a == name} for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    relative = name.removeprefix("modeling_multimodal").removeprefix(".")
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if relative == prefix or (prefix and relative.startswith(prefix + ".")):
                return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS in {__file__}")


def test_the_graph_sees_the_package():
    assert {"modeling_multimodal.modeling_multimodal", "modeling_multimodal.processing.processing_multimodal",
            "modeling_multimodal.training.trainer", "modeling_multimodal.hub.push"} <= set(MODULES)  # fmt: skip
    assert "modeling_multimodal.configuration" in GRAPH["modeling_multimodal.modeling_multimodal"]
    for a, b in EXCEPTIONS:  # an exception that no longer happens should be removed
        assert b in imports_of(a, MODULES[a]), f"{a} no longer imports {b}: remove it from EXCEPTIONS"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_from_a_higher_layer(name):
    upward = [target for target in sorted(GRAPH[name]) if layer_of(target) > layer_of(name)]
    assert not upward, (
        f"{name} ({LAYERS[layer_of(name)][0]}) imports from higher layers: "
        + ", ".join(f"{target} ({LAYERS[layer_of(target)][0]})" for target in upward)
    )


def test_no_import_cycle():
    state, cycles = {}, []

    def visit(name, stack):
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
