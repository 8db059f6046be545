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
