"""Small tokenizers trained offline, for models built from scratch (tests, the demo).

The Hub is not always reachable, and a from-scratch model on a small domain (the demo's captions and
transcripts) learns faster with a small vocabulary. `build_tokenizer` trains one with the
`tokenizers` library and returns a regular `PreTrainedTokenizerFast` that saves and loads like any
Hub tokenizer. The media placeholders are added as special tokens here, as
`from_pretrained_components` adds them to a pretrained tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .configuration.media_registry import PLACEHOLDERS

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
MEDIA_TOKENS = PLACEHOLDERS  # {"image": "<image>", ...}, declared in configuration.media_registry


def build_tokenizer(
    texts: Iterable[str], kind: str = "word", vocab_size: int = 1000, media_tokens: bool = True
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts`.

    kind="word": lower-cased whitespace/punctuation words (tiny vocabularies, exact captions);
    kind="bpe": byte-level BPE with `vocab_size` entries (open-ended text, never produces <unk>).
    media_tokens=False leaves the placeholders out (a plain LM tokenizer, as on the Hub).
    """
    special = [PAD, BOS, EOS, UNK, *(MEDIA_TOKENS.values() if media_tokens else ())]
    if kind == "word":
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, cleans up punctuation
        trainer = trainers.WordLevelTrainer(special_tokens=special, vocab_size=vocab_size)
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            special_tokens=special, vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        raise ValueError(f"kind={kind!r}; expected 'word' or 'bpe'")
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    if media_tokens:
        wrapped.add_special_tokens({"additional_special_tokens": list(MEDIA_TOKENS.values())})
    return wrapped
