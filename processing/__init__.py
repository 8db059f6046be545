"""Processors (installed as `modeling_multimodal.processing`)."""
