"""Truncation that never cuts a media span: a cut through media tokens raises instead."""


def truncate_outside_media(encoded, max_length: int, media_ids: set[int], left: bool):
    """Cut each sample of `encoded` (a tokenizer output, lists per sample) to `max_length` tokens, from the left
    when `left` (the tokenizer's `truncation_side`), else from the right; raise when the cut would remove any of
    `media_ids`."""
    for sample, ids in enumerate(encoded["input_ids"]):
        if len(ids) <= max_length:
            continue
        cut = len(ids) - max_length if left else max_length  # left: drop ids[:cut]; right: drop ids[cut:]
        dropped = ids[:cut] if left else ids[cut:]
        if media_ids.intersection(dropped):
            positions = [i for i, token_id in enumerate(ids) if token_id in media_ids]
            raise ValueError(
                f"sample {sample} has {len(ids)} tokens with media tokens at positions {positions[0]}..{positions[-1]}; "
                f"truncating to max_length={max_length} would cut a media span. Raise max_length, shorten the "
                "text, or drop whole turns with apply_chat_template(..., drop_trailing_turns=True)"
            )
        for key in list(encoded.keys()):
            values = encoded[key][sample]
            encoded[key][sample] = values[cut:] if left else values[:cut]
    return encoded
