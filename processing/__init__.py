"""Processors (installed as `modeling_multimodal.processing`).

`register_processors()` makes `AutoProcessor` and `AutoImageProcessor` resolve our classes for
`MultimodalConfig`; `modeling_multimodal/__init__.py` calls it on import. transformers 5.24 hides
`AutoVideoProcessor` entirely behind torchvision, so the video processor is registered only where
torchvision is installed; `MultimodalProcessor.from_pretrained` never needs that Auto class.
"""

from .image_processing_multimodal import MediaInputError, MultimodalImageProcessor
from .processing_multimodal import ASSISTANT_PREFIX, DEFAULT_CHAT_TEMPLATE, MultimodalProcessor
from .video_processing_multimodal import MultimodalVideoProcessor, SampledVideoMetadata


def register_processors() -> None:
    """Register our processors with transformers' Auto classes (idempotent)."""
    from transformers import AutoImageProcessor, AutoProcessor

    from ..configuration import MultimodalConfig

    AutoProcessor.register(MultimodalConfig, MultimodalProcessor, exist_ok=True)
    AutoImageProcessor.register(
        MultimodalConfig,
        image_processor_classes={"pil": MultimodalImageProcessor, "torchvision": MultimodalImageProcessor},
        exist_ok=True,
    )
    try:  # the whole module is a torchvision-gated placeholder in transformers 5.24 without torchvision
        from transformers.models.auto.video_processing_auto import AutoVideoProcessor

        AutoVideoProcessor.register(
            MultimodalConfig,
            video_processor_classes={"pil": MultimodalVideoProcessor, "torchvision": MultimodalVideoProcessor},
            exist_ok=True,
        )
    except ImportError:
        pass


__all__ = [
    "ASSISTANT_PREFIX",
    "DEFAULT_CHAT_TEMPLATE",
    "MediaInputError",
    "MultimodalImageProcessor",
    "MultimodalProcessor",
    "MultimodalVideoProcessor",
    "SampledVideoMetadata",
    "register_processors",
]
