"""modeling-multimodal: vision, audio and video encoders projected into any causal LM."""

from .configuration import MediaTokenLayout, MultimodalConfig

__all__ = ["MultimodalConfig", "MediaTokenLayout"]
