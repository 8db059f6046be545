"""Configuration of the multimodal model (installed as `modeling_multimodal.configuration`)."""

from .configuration_multimodal import MultimodalConfig
from .media_tokens import MediaTokenLayout

__all__ = ["MultimodalConfig", "MediaTokenLayout"]
