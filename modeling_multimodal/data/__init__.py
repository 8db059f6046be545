"""The data layer shared by training and evaluation: manifests, task templates, example encoding, collation.

Imports flow one way: `training` and `evaluation` build on this package; it imports neither.
"""

from .collator import LengthGroupedBatchSampler, MultimodalCollator
from .examples import TASKS, EncodedDataset, ExampleEncoder, TaskSpec, build_example, get_task, load_manifest

__all__ = [
    "TASKS",
    "EncodedDataset",
    "ExampleEncoder",
    "LengthGroupedBatchSampler",
    "MultimodalCollator",
    "TaskSpec",
    "build_example",
    "get_task",
    "load_manifest",
]
