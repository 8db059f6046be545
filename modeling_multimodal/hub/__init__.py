"""Share checkpoints on the Hugging Face Hub, one job per module:

- `model_card`: our model card, rendered from `model_card_inputs.json` (or from the folder's configs);
- `custom_code`: the flattened code and `auto_map` that let a checkpoint load without the package;
- `folder`: what a checkpoint folder holds and what a push uploads from it;
- `weights`: a LoRA adapter merged into its base model, weights resharded;
- `push`: the one-commit upload, with a timeout on every request.
"""

from .custom_code import (
    AUTO_MAP,
    CODE_ROOTS,
    COMPONENT_AUTO_MAPS,
    PROCESSOR_AUTO_MAP,
    PROCESSOR_CONFIG,
    REMOTE_CODE_REQUIREMENTS,
    carries_our_model,
    carries_our_processor,
    code_saved_flat,
    config_with_auto_map,
    custom_code_files,
    custom_code_for_checkpoint,
    processor_config_with_auto_map,
    save_custom_code,
)
from .folder import (
    CARD_INPUTS_FILENAME,
    IGNORE_PATTERNS,
    PICKLE_SUFFIXES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    checkpoint_files,
    weight_files,
)
from .model_card import (
    REPO_ID_PATTERN,
    TEMPLATE_NAME,
    model_card_for_checkpoint,
    modalities_of_config,
    render_model_card,
    template_path,
    training_card_inputs,
    write_model_card_inputs,
)
from .push import DEFAULT_COMMIT_MESSAGE, DEFAULT_PUSH_TIMEOUT_S, hub_request_timeout, push_checkpoint
from .weights import merge_adapter_checkpoint, reshard_weights

__all__ = [
    "AUTO_MAP",
    "CARD_INPUTS_FILENAME",
    "CODE_ROOTS",
    "COMPONENT_AUTO_MAPS",
    "DEFAULT_COMMIT_MESSAGE",
    "DEFAULT_PUSH_TIMEOUT_S",
    "IGNORE_PATTERNS",
    "PICKLE_SUFFIXES",
    "PROCESSOR_AUTO_MAP",
    "PROCESSOR_CONFIG",
    "REMOTE_CODE_REQUIREMENTS",
    "REPO_ID_PATTERN",
    "TEMPLATE_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "carries_our_model",
    "carries_our_processor",
    "checkpoint_files",
    "code_saved_flat",
    "config_with_auto_map",
    "custom_code_files",
    "custom_code_for_checkpoint",
    "hub_request_timeout",
    "merge_adapter_checkpoint",
    "modalities_of_config",
    "model_card_for_checkpoint",
    "processor_config_with_auto_map",
    "push_checkpoint",
    "render_model_card",
    "reshard_weights",
    "save_custom_code",
    "template_path",
    "training_card_inputs",
    "write_model_card_inputs",
]
