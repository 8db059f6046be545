"""Adapters that let other tools run our checkpoints: lmms-eval (`lmms_eval`)."""
