"""Chat rows in the layouts users already have -> one internal shape: HF `messages` with typed content items.

Formats (named per manifest entry with `format:`, or detected from each row by `detect_format`):
- `llava`: LLaVA-Instruct JSON. `conversations` = [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}],
  media in an `image` (or `video` / `audio`) field, one path or a list, relative to the media root
  (`data.image_folder` or the entry's `media_root`).
- `sharegpt`: ShareGPT / LLaMA-Factory multimodal. `conversations` or `messages`, turns as {from, value} or
  {role, content}; `<image>` / `<audio>` / `<video>` in the text are filled in order from the `images` /
  `audios` / `videos` lists; an optional `system` string and `tools` (JSON string or list) field.
- `openai`: OpenAI chat content. `messages` whose content items are {"type": "text"}, {"type": "image_url",
  "image_url": {"url": path | "file://..." | "data:..."}} or {"type": "input_audio", "input_audio": {"data":
  base64, "format": "wav"}}; role "developer" is a system turn.
- `messages`: the HF layout: `messages` with roles system/user/assistant/tool and content a string or typed
  items ({"type": "image", "image": path} ...).
- `fields`: simple columns mapped by a task template (`examples.TaskSpec`); rows are left as they are.

Every chat format becomes `[{"role", "content"}]` where content is a string when the turn is text only, else
a list of {"type": "text", "text"} / {"type": modality, modality: path-or-data-URL} items in their order, so a
conversation means the same thing (and encodes to the same tensors) whatever format it was written in. A row
that cannot be mapped raises a `ValueError` naming the source, the row id and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping

from ..configuration.media_registry import MODALITIES
from ..tokenization import MEDIA_TOKENS

FORMATS = ("llava", "sharegpt", "openai", "messages", "fields")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT / LLaVA `from` values (LLaMA-Factory's defaults) -> chat roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "observation": "tool", "tool": "tool", "function_call": "assistant",
}
MEDIA_LIST_FIELDS = {"image": "images", "audio": "audios", "video": "videos"}  # ShareGPT / LLaMA-Factory
LLAVA_MEDIA_FIELDS = {"image": "image", "audio": "audio", "video": "video"}  # LLaVA: one path or a list
PLACEHOLDER = re.compile("(" + "|".join(re.escape(token) for token in MEDIA_TOKENS.values()) + ")")
MODALITY_OF_TOKEN = {token: modality for modality, token in MEDIA_TOKENS.items()}


def detect_format(row: Mapping) -> str:
    """The format of one row, from its keys (see the module docstring)."""
    if row.get("conversations") is not None:
        return "sharegpt" if any(row.get(f) is not None for f in MEDIA_LIST_FIELDS.values()) else "llava"
    messages = row.get("messages")
    if messages is None:
        return "fields"
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return "messages"  # reported with its row by the messages reader
    if any(row.get(f) is not None for f in MEDIA_LIST_FIELDS.values()):
        return "sharegpt"
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, Mapping):
            if "from" in message or "value" in message:
                return "sharegpt"
            content = message.get("content")
            if isinstance(content, list) and any(
                isinstance(i, Mapping) and i.get("type") in ("image_url", "input_audio") for i in content
            ):
                return "openai"
    return "messages"


def _fail(where: str, problem: str):
    raise ValueError(f"{where}: {problem}")


def _listed(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _media_path(value, media_root: str | None):
    """A relative media path joined to the format's media root (LLaVA's image folder); others unchanged."""
    if isinstance(value, str) and media_root is not None and not value.startswith("data:") and not os.path.isabs(value):
        return os.path.join(media_root, value)
    return value


def _canonical(role: str, items: list[dict]) -> dict:
    """A message with text-only content as one string (so `"hi"` and `[{"type": "text", "text": "hi"}]` agree)."""
    items = [i for i in items if i["type"] != "text" or i["text"]]
    if all(i["type"] == "text" for i in items):
        return {"role": role, "content": " ".join(i["text"] for i in items)}
    return {"role": role, "content": items}


def split_at_placeholders(text: str, media: dict[str, list], used: dict[str, int], where: str) -> list[dict]:
    """"<image>\\nwhat is it?" -> [image item (the next of `media["image"]`), text item]; `used` counts the items
    taken so far per modality (shared across a conversation's turns). Every format fills placeholders this way."""
    items = []
    for piece in PLACEHOLDER.split(text):
        if piece in MODALITY_OF_TOKEN:
            modality = MODALITY_OF_TOKEN[piece]
            if used[modality] >= len(media[modality]):
                _fail(where, f"more {piece} placeholders than the {len(media[modality])} {modality} item(s) its media list holds")
            items.append({"type": modality, modality: media[modality][used[modality]]})
            used[modality] += 1
        elif piece.strip():
            items.append({"type": "text", "text": piece.strip()})
    return items


def _conversation(row: Mapping, where: str, media_fields: dict[str, str], media_root: str | None) -> list[dict]:
    """LLaVA / ShareGPT turns with placeholders filled in order from the row's media fields."""
    turns = row.get("conversations") if row.get("conversations") is not None else row.get("messages")
    if isinstance(turns, str):
        turns = _json(turns, where, "conversations")
    if not isinstance(turns, list) or not turns:
        _fail(where, f"expected 'conversations' (or 'messages') as a non-empty list of turns, got {turns!r:.80}")
    media = {m: [_media_path(v, media_root) for v in _listed(row.get(f))] for m, f in media_fields.items()}
    used = dict.fromkeys(MODALITIES, 0)
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"].strip()})
    for position, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            _fail(where, f"turn {position} is {type(turn).__name__}, expected {{'from', 'value'}} or {{'role', 'content'}}")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker not in SHAREGPT_ROLES:
            _fail(where, f"turn {position} has from/role {speaker!r}, which maps to no chat role; expected one of {sorted(SHAREGPT_ROLES)}")
        if not isinstance(text, str):
            _fail(where, f"turn {position}: expected its value/content as a string, got {type(text).__name__}")
        messages.append(_canonical(SHAREGPT_ROLES[speaker], split_at_placeholders(text, media, used, f"{where}, turn {position}")))
    for modality, items in media.items():
        if used[modality] != len(items):
            _fail(where, f"{len(items)} {modality} item(s) in {media_fields[modality]!r} but {used[modality]} {MEDIA_TOKENS[modality]} placeholder(s) in the text")
    return messages


def _json(text: str, where: str, key: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        _fail(where, f"{key!r} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})")


def _openai_item(item, where: str, media_root: str | None) -> dict:
    kind = item.get("type") if isinstance(item, Mapping) else None
    if kind == "text":
        return {"type": "text", "text": item.get("text") or ""}
    if kind == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str) or not url:
            _fail(where, f"an image_url item needs {{'url': path | 'file://...' | 'data:...'}}, got {item!r:.80}")
        if url.startswith(("http://", "https://")):
            _fail(where, f"image_url {url[:80]!r} is a web address; training reads local files or data: URLs only")
        if url.startswith("file://"):
            url = url[len("file://"):]
        return {"type": "image", "image": _media_path(url, media_root)}
    if kind == "input_audio":
        audio = item.get("input_audio")
        if not isinstance(audio, Mapping) or not isinstance(audio.get("data"), str) or not audio.get("format"):
            _fail(where, f"an input_audio item needs {{'data': base64, 'format': 'wav' | 'mp3' ...}}, got {item!r:.80}")
        return {"type": "audio", "audio": f"data:audio/{audio['format']};base64,{audio['data']}"}
    if kind in MODALITIES:
        return _typed_item(item, where, media_root)
    _fail(where, f"unknown content type {kind!r}; expected text, image_url, input_audio (or image/audio/video)")


def _typed_item(item, where: str, media_root: str | None = None) -> dict:
    kind = item.get("type") if isinstance(item, Mapping) else None
    if kind == "text":
        return {"type": "text", "text": item.get("text") or ""}
    if kind not in MODALITIES:
        _fail(where, f"unknown content type {kind!r}; expected 'text', 'image', 'audio' or 'video'")
    value = next((item[key] for key in (kind, "path", "url") if item.get(key) is not None), None)
    if value is None:
        _fail(where, f"a {kind} content item has no {kind!r}/'path'/'url' value")
    out = {"type": kind, kind: _media_path(value, media_root)}
    if kind == "video" and item.get("use_audio_in_video"):
        out["use_audio_in_video"] = True
    return out


def _messages(row: Mapping, where: str, media_root: str | None, openai: bool) -> list[dict]:
    messages = row.get("messages")
    if isinstance(messages, str):
        messages = _json(messages, where, "messages")
    if not isinstance(messages, list) or not messages:
        _fail(where, f"expected 'messages' as a non-empty list of {{'role', 'content'}}, got {messages!r:.80}")
    out = []
    for position, message in enumerate(messages):
        turn = f"{where}, message {position}"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            _fail(turn, f"expected {{'role', 'content'}}, got {message!r:.80}")
        role = "system" if openai and message["role"] == "developer" else message["role"]
        if role not in ROLES:
            hint = f" (ShareGPT's {role!r}: name the entry's format: sharegpt)" if role in SHAREGPT_ROLES else ""
            _fail(turn, f"unknown role {role!r}; expected one of {list(ROLES)}{hint}")
        content = message["content"]
        if isinstance(content, str):
            items = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            reader = _openai_item if openai else _typed_item
            items = [reader(item, turn, media_root) for item in content]
        else:
            _fail(turn, f"content must be a string or a list of items, got {type(content).__name__}")
        out.append(_canonical(role, items))
    return out


def to_messages(row: Mapping, fmt: str | None, where: str, media_root: str | None = None) -> list[dict]:
    """Row -> internal messages (module docstring). `fmt` None: detected; `where` names the row in errors."""
    fmt = fmt or detect_format(row)
    if fmt == "llava":
        return _conversation(row, where, LLAVA_MEDIA_FIELDS, media_root)
    if fmt == "sharegpt":
        return _conversation(row, where, MEDIA_LIST_FIELDS, media_root)
    if fmt in ("openai", "messages"):
        return _messages(row, where, media_root, openai=fmt == "openai")
    _fail(where, f"format {fmt!r} is not a chat format; expected one of {FORMATS[:-1]}")


def row_tools(row: Mapping, where: str):
    """A ShareGPT row's `tools` (JSON string or list) as a list, or None."""
    tools = row.get("tools")
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        tools = _json(tools, where, "tools")
    if not isinstance(tools, list):
        _fail(where, f"'tools' must be a list of tool definitions, got {type(tools).__name__}")
    return tools


def decode_data_url(url: str, where: str) -> bytes:
    """The bytes of a `data:<mime>;base64,<payload>` URL (OpenAI image_url / input_audio)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        _fail(where, f"media data URL {url[:40]!r}...: expected 'data:<mime>;base64,<payload>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        _fail(where, f"media data URL {url[:40]!r}...: its payload is not valid base64")


__all__ = ["FORMATS", "ROLES", "decode_data_url", "detect_format", "row_tools", "to_messages"]
