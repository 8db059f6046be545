"""Retrieval: the shared image / video / audio - text space that `L_contrastive` trains.

`RetrievalMixin` gives `MultimodalForConditionalGeneration` its `get_retrieval_embeddings` and the two passes
behind it: a text-only LM pass over the text and a media-only LM pass over each item's LM-ready tokens, each
mean-pooled and projected by the `retrieval_head` (`losses.RetrievalHead`), then L2-normalised. The text side
never sees the media, nor the media side the text (see docs/MODEL.md on `L_contrastive`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .encoders import FEATURES_ONLY
from .losses import masked_mean


class RetrievalMixin:
    """Methods of `MultimodalForConditionalGeneration` (reads `self.model`, `self.retrieval_head`)."""

    def _require_retrieval_head(self):
        if self.retrieval_head is None:
            raise ValueError(
                "This model has no retrieval head: it is built when contrastive_loss_weight (α) > 0 or "
                "retrieval_head=True in the config (a checkpoint trained with α > 0 carries one)."
            )
        return self.retrieval_head

    def get_retrieval_embeddings(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        video_audio_features: torch.Tensor | None = None,
        video_audio_features_mask: torch.Tensor | None = None,
        image_tiles: torch.Tensor | None = None,
        video_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n, contrastive_dim) L2-normalised embeddings of the shared retrieval space that `L_contrastive` trains, of
        one modality's inputs: texts (`input_ids`, `attention_mask`), images, videos or audio clips. The dot product
        of two embeddings is their cosine similarity (text-to-image scores: `texts @ images.T`). Videos may come with
        their sound tracks (`video_audio_features`, the processor's `use_audio_in_video`): the embedding then reads
        the interleaved frame and track tokens. `image_tiles` / `video_frames`: as the processor gives them (tiled
        images, videos sampled at a rate), one embedding per image / video.
        """
        if video_audio_features is not None and pixel_values_videos is None:
            raise ValueError("video_audio_features are videos' sound tracks: pass them with pixel_values_videos.")
        given = {
            name: value
            for name, value in (
                ("input_ids", input_ids), ("pixel_values", pixel_values),
                ("pixel_values_videos", pixel_values_videos), ("input_features", input_features),
            )
            if value is not None
        }
        if len(given) != 1:
            raise ValueError(
                "get_retrieval_embeddings embeds one modality per call: pass exactly one of input_ids, pixel_values, "
                f"pixel_values_videos, input_features (got {sorted(given) or 'none'})."
            )
        self._require_retrieval_head()
        if input_ids is not None:
            return self._text_embeddings(input_ids, attention_mask)
        if pixel_values is not None:
            features = self.model.get_image_features(pixel_values, image_tiles, **FEATURES_ONLY, output_attentions=False)
        elif pixel_values_videos is not None:
            features = self.model.get_video_features(
                pixel_values_videos, video_audio_features, video_audio_features_mask, **FEATURES_ONLY, output_attentions=False,
                video_frames=video_frames,
            )
        else:
            features = self.model.get_audio_features(input_features, input_features_mask, **FEATURES_ONLY)
            return self._media_embeddings(features.clips())
        return self._media_embeddings(list(features.pooler_output))

    def _text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only LM pass, mean over real tokens, projected and L2-normalised: the text side of retrieval."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model.language_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.retrieval_head.embed_text(masked_mean(hidden.last_hidden_state, attention_mask.bool()))

    def _media_embeddings(self, media_tokens: list[torch.Tensor]) -> torch.Tensor:
        """Media-only LM pass over each item's LM-ready tokens (n_i, d), mean-pooled, projected, L2-normalised.

        The media side of retrieval reads its tokens through the LM, as the text side reads its words: the
        LM sees the tokens in order, so where something is in an image (and when, in a video) survives
        into the embedding; a plain mean over an image's patch tokens loses it.
        Each item is its own sequence, so an embedding never depends on the rest of the batch.
        """
        if not media_tokens:
            return self.retrieval_head.media_projection.weight.new_zeros(0, self.retrieval_head.media_projection.out_features)
        lengths = torch.tensor([t.shape[0] for t in media_tokens], device=media_tokens[0].device)
        padded = torch.stack([F.pad(t, (0, 0, 0, int(lengths.max()) - t.shape[0])) for t in media_tokens])
        mask = torch.arange(padded.shape[1], device=padded.device) < lengths[:, None]
        hidden = self.model.language_model(inputs_embeds=padded, attention_mask=mask.long(), use_cache=False)
        return self.retrieval_head.embed_media(masked_mean(hidden.last_hidden_state, mask))

    def _media_text_pairs(self, outputs, pair_input_ids, pair_attention_mask, segment_ids):
        """(media tokens per sample, pair ids (n, S), pair mask (n, S)) of the samples with media and a pair text.

        A sample's media tokens are its merged media features (the LM's input at its placeholders, in
        order), not hidden states: the text side of `L_contrastive` must not see the media, nor the media side
        the text.
        """
        embeds, media_mask = outputs.inputs_embeds, outputs.media_mask.bool()
        if pair_input_ids is None:  # this rank has no pairs, but may join the other ranks' gather
            pair_input_ids = torch.zeros(0, 1, dtype=torch.long, device=embeds.device)
        if pair_attention_mask is None:
            pair_attention_mask = torch.ones_like(pair_input_ids)
        if segment_ids is None:  # one sample per row
            segment_ids = torch.arange(embeds.shape[0], device=embeds.device)[:, None].expand(media_mask.shape)
        num_samples = pair_input_ids.shape[0]
        membership = (segment_ids[..., None] == torch.arange(num_samples, device=embeds.device)) & media_mask[..., None]
        paired = membership.any((0, 1)) & pair_attention_mask.bool().any(-1)
        tokens = [embeds[membership[..., i]] for i in paired.nonzero().flatten().tolist()]
        return tokens, pair_input_ids[paired], pair_attention_mask[paired]
