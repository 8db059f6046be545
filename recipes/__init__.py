"""Training recipes (YAML), installed as `modeling_multimodal.recipes`."""
