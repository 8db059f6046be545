"""Model card templates, rendered by `modeling_multimodal.hub.render_model_card` (installed as `modeling_multimodal.model_cards`)."""
