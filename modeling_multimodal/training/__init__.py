"""Training: data (manifests, task templates, encoding), batching (collator, length grouping), packing.

The trainer loop (`trainer.py`) builds on these public names.
"""

from .collator import LengthGroupedBatchSampler, MultimodalCollator
from .data import TASKS, EncodedDataset, ExampleEncoder, TaskSpec, build_example, get_task, load_manifest
from .packing import PackedBatchSampler, PackingCollator, first_fit

__all__ = [
    "TASKS",
    "EncodedDataset",
    "ExampleEncoder",
    "LengthGroupedBatchSampler",
    "MultimodalCollator",
    "PackedBatchSampler",
    "PackingCollator",
    "TaskSpec",
    "build_example",
    "first_fit",
    "get_task",
    "load_manifest",
]
