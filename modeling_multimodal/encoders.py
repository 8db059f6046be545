"""Encoder passes that differ from the towers' own `forward`.

Audio: `WhisperEncoder.forward` only takes 30 s of mel frames (3000) and ignores its attention mask,
so a 2 s clip costs as much as a 30 s one and padding leaks into other clips' features. `encode_audio`
runs the same weights (conv stem, the first rows of the position table, the layers) on the batch's
real length, with the padded frames masked out of the attention: a clip's features do not depend on
what it is batched with.

Vision: features from a chosen hidden layer, with or without the CLS token (as LLaVA does).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel
from transformers.masking_utils import create_bidirectional_mask

from .configuration.media_tokens import AUDIO_CONV_STRIDE

# get_<modality>_features for the LM-ready features alone
FEATURES_ONLY = {"output_hidden_states": False, "return_dict": True}


def build_audio_tower(audio_config) -> nn.Module:
    """The encoder half of Whisper (or a Qwen2-Audio encoder, which has the same layout)."""
    if audio_config.model_type == "whisper":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(audio_config)
    return AutoModel.from_config(audio_config)


def _audio_stem(tower: nn.Module, input_features: torch.Tensor, mel_lengths: torch.Tensor):
    """The conv stem and position table on the batch's real length: (embeddings, positions per clip, attention mask)."""
    max_positions = tower.embed_positions.num_embeddings
    frames = input_features.shape[-1]
    frame_mask = torch.arange(frames, device=input_features.device)[None, :] < mel_lengths[:, None]
    features = input_features * frame_mask[:, None, :].to(input_features.dtype)
    hidden = F.gelu(tower.conv1(features))
    # Zero the stem's output past each clip's end, as the conv's own zero padding would be for a clip alone.
    hidden = hidden * frame_mask[:, None, :].to(hidden.dtype)
    hidden = F.gelu(tower.conv2(hidden)).transpose(1, 2)  # (n, ceil(T/2), d)
    hidden = hidden[:, :max_positions]
    positions = ((mel_lengths + AUDIO_CONV_STRIDE - 1) // AUDIO_CONV_STRIDE).clamp(max=max_positions)
    length = hidden.shape[1]
    hidden = hidden + tower.embed_positions.weight[:length].to(hidden.dtype)
    hidden = F.dropout(hidden, p=tower.config.dropout, training=tower.training)
    padding_mask = torch.arange(length, device=hidden.device)[None, :] < positions[:, None]  # (n, L)
    attention_mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=padding_mask)
    return hidden, positions, attention_mask


def encode_audio(
    tower: nn.Module, input_features: torch.Tensor, mel_lengths: torch.Tensor, feature_layer: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a Whisper-style encoder on clips of different lengths, up to the selected layer only.

    input_features (n, n_mels, T) right-padded; mel_lengths (n,) real frames per clip.
    Returns hidden states (n, L, d) with L = the longest clip's positions, and positions per clip.
    """
    hidden, positions, attention_mask = _audio_stem(tower, input_features, mel_lengths)
    num_layers = len(tower.layers)
    target = feature_layer % (num_layers + 1)  # index into [embeddings, layer 1, ..., layer N]
    for layer in tower.layers[:target]:
        hidden = layer(hidden, attention_mask)
    if target == num_layers:  # the encoder's final output is layer-normed
        hidden = tower.layer_norm(hidden)
    return hidden, positions


def encode_audio_layers(
    tower: nn.Module, input_features: torch.Tensor, mel_lengths: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...], torch.Tensor]:
    """`encode_audio` through every layer, keeping each: (hidden states, attentions, positions).

    hidden states: the embeddings and each layer's output (N + 1 tensors, the last one layer-normed as the
    encoder's output), so `hidden_states[feature_layer]` is what `encode_audio` returns for that layer;
    attentions: each layer's attention weights (n, heads, L, L), as the layer's attention computes them (eager
    attention; None under SDPA, which does not return them).
    """
    hidden, positions, attention_mask = _audio_stem(tower, input_features, mel_lengths)
    states, attentions = [hidden], []
    hooks = [layer.self_attn.register_forward_hook(lambda _m, _a, out: attentions.append(out[1])) for layer in tower.layers]
    try:
        for layer in tower.layers:
            states.append(layer(states[-1], attention_mask))
    finally:
        for hook in hooks:
            hook.remove()
    states[-1] = tower.layer_norm(states[-1])
    return tuple(states), tuple(attentions), positions


def select_vision_features(hidden_states: tuple[torch.Tensor, ...], layers: list[int], drop_cls: bool) -> torch.Tensor:
    """(n, 1 + patches, d * len(layers)): the hidden states of `layers` side by side, without CLS when `drop_cls`."""
    selected = hidden_states[layers[0]] if len(layers) == 1 else torch.cat([hidden_states[layer] for layer in layers], dim=-1)
    return selected[:, 1:] if drop_cls else selected


def has_trainable_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def run_frozen_aware(tower: nn.Module, fn, *args, **kwargs):
    """Call `fn` without building an autograd graph when no parameter of `tower` is trained.

    A frozen encoder then keeps no activations (the `align` stage's memory win); with LoRA or full
    training on the tower, gradients flow as usual.
    """
    if torch.is_grad_enabled() and not has_trainable_parameters(tower):
        with torch.no_grad():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)
