"""Training: recipes, the model a recipe builds, the data mixture, packing, the objective, the loop, exports.

One job per module, imports flowing one way (`trainer` at the top):
    recipe.py         the YAML recipe and its checks
    model_builder.py  the recipe's model and processor (a tokenizer trained on the rows when from scratch)
    stages.py         what trains per stage (LoRA through PEFT) and the optimizer's parameter groups
    mixture.py        the training data mixture: manifests → one dataset, its example cache, the loader
    packing.py        several samples per row
    objective.py      the module Accelerate wraps: touch pass, cross-rank gather, global item counts
    checkpointing.py  exact, pickle-free checkpoints;  run_folder.py  one run per output folder
    export.py         final/: merged model, adapter, processor, code, card inputs, report
    trainer.py        the loop and evaluation during training
The data layer itself (manifests, tasks, encoding, collation) is `modeling_multimodal.data`.
"""

from .packing import PACKED_ATTENTION, PackedBatchSampler, PackingCollator, first_fit, use_per_sample_attention

__all__ = ["PACKED_ATTENTION", "PackedBatchSampler", "PackingCollator", "first_fit", "use_per_sample_attention"]
