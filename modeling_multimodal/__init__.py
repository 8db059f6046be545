"""modeling-multimodal: vision, audio and video encoders projected into any causal LM.

Importing the package registers the classes with transformers' Auto classes, so
`AutoConfig` / `AutoModel` / `AutoModelForImageTextToText` / `AutoModelForMultimodalLM` resolve our checkpoints
(the last is what `pipeline("any-to-any")` loads: images, audio and video in, text out).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM

from .configuration import MediaTokenLayout, MultimodalConfig
from .modeling_multimodal import MultimodalForConditionalGeneration, MultimodalModel, MultimodalPreTrainedModel
from .processing import MultimodalImageProcessor, MultimodalProcessor, MultimodalVideoProcessor, register_processors

AutoConfig.register(MultimodalConfig.model_type, MultimodalConfig, exist_ok=True)
AutoModel.register(MultimodalConfig, MultimodalModel, exist_ok=True)
AutoModelForImageTextToText.register(MultimodalConfig, MultimodalForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(MultimodalConfig, MultimodalForConditionalGeneration, exist_ok=True)
register_processors()
# Registered for their Auto classes as transformers' remote-code classes are, so a plain `save_pretrained` writes the
# flattened code and `auto_map` next to the weights (see `hub.custom_code.code_saved_flat`).
MultimodalConfig.register_for_auto_class()
MultimodalModel.register_for_auto_class("AutoModel")
MultimodalForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MultimodalProcessor.register_for_auto_class()

__all__ = [
    "MediaTokenLayout",
    "MultimodalConfig",
    "MultimodalForConditionalGeneration",
    "MultimodalImageProcessor",
    "MultimodalModel",
    "MultimodalPreTrainedModel",
    "MultimodalProcessor",
    "MultimodalVideoProcessor",
]
