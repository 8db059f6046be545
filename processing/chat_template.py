"""Chat messages -> the processor's text and media: the chat template, assistant masks and turn dropping.

`ChatTemplateMixin` gives `MultimodalProcessor` its `apply_chat_template`. Content items that carry media are
collected in message order and written into the rendered text as placeholders: as typed items for templates
that read a message's content as a list (`DEFAULT_CHAT_TEMPLATE`, VLM templates), or as `<image>` ... inside
the text for templates that read it as one string (a text LM's own: ChatML and the like), so the LM's own
chat template is kept. Assistant replies are located by the template's `{% generation %}` blocks or, for
templates without them, by rendering the conversation prefix by prefix; `drop_trailing_turns` drops whole
trailing turns until a conversation fits `max_length`.
"""

import bisect
import os
import re

import torch
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging
from transformers.utils.chat_template_utils import _get_template_variables, render_jinja_template

from ..configuration.media_tokens import MODALITIES

logger = logging.get_logger(__name__)

# Plain-word role markers, so that tiny word-level tokenizers handle the template; each message ends with the
# tokenizer's EOS token. The assistant's reply is the text between ASSISTANT_PREFIX and its EOS (inclusive of
# the EOS), which `return_assistant_tokens_mask=True` marks through the `{% generation %}` block.
ASSISTANT_PREFIX = "assistant:"
# OpenAI-style content parts (as vLLM's server and lmms-eval write them) and the media kind each one is.
MEDIA_PART_KINDS = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}
_KINDS_JINJA = "{%- set MEDIA_PART_KINDS = " + repr(MEDIA_PART_KINDS) + " -%}"
DEFAULT_CHAT_TEMPLATE = (
    _KINDS_JINJA
    + "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ ' ' + content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{ ' ' + item['text'] }}"
    "{%- else -%}{{ ' <' + MEDIA_PART_KINDS.get(item['type'], item['type']) + '>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'assistant:' }}{% generation %}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['role'] + ':' }}{{ render(message['content']) }}{{ eos_token }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant:' }}{%- endif -%}"
)
MEDIA_PARTS_MARKER = "{#- media content parts written as placeholders (modeling_multimodal) -#}"


def with_media_parts_as_placeholders(template: str, placeholders: dict[str, str]) -> str:
    """`template` (one that renders a message's content as one string: a text LM's ChatML and the like) preceded by
    a plain-Jinja prelude that turns list content into that string: text parts joined by spaces, each media part
    (`image`, `image_url`, `audio`, `input_audio`, `video`, ...) written as its placeholder. So the saved template
    renders media parts wherever it is rendered, by vLLM's server as by `apply_chat_template`."""
    if template.startswith(MEDIA_PARTS_MARKER):
        return template
    kinds = {**{kind: kind for kind in placeholders}, **MEDIA_PART_KINDS}
    part = {name: placeholders[kind] for name, kind in kinds.items()}
    prelude = (
        MEDIA_PARTS_MARKER
        + "{%- set media_placeholders = " + repr(part) + " -%}"
        + "{%- set flat = namespace(messages=[]) -%}"
        + "{%- for message in messages -%}"
        + "{%- if message['content'] is string or message['content'] is none -%}"
        + "{%- set flat.messages = flat.messages + [message] -%}"
        + "{%- else -%}{%- set parts = namespace(text=[]) -%}"
        + "{%- for item in message['content'] -%}"
        + "{%- if item['type'] == 'text' -%}{%- set parts.text = parts.text + [item['text']] -%}"
        + "{%- elif item['type'] in media_placeholders -%}{%- set parts.text = parts.text + [media_placeholders[item['type']]] -%}"
        + "{%- endif -%}{%- endfor -%}"
        + "{%- set flat.messages = flat.messages + [dict(message, content=parts.text | join(' '))] -%}"
        + "{%- endif -%}{%- endfor -%}"
        + "{%- set messages = flat.messages -%}"
    )
    return prelude + template


TRACK_FLAGS = "use_audio_in_video"  # per video item: also read the video file's sound track (see the processor)
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")  # templates that mark the assistant's replies themselves


class ChatTemplateMixin(ProcessorMixin):
    """`ProcessorMixin` with our `apply_chat_template` and its helpers, for a processor with `tokenizer`, `system_prompt`,
    `placeholder(kind)` and a `__call__` that takes `return_offsets_mapping` and `return_text_replacement_offsets`.

    A `ProcessorMixin` subclass (not a mixin beside it) so that the processor's first base is a class that has
    `ProcessorMixin`'s whole interface (`replace_image_token` ...), as transformers' processor tests expect."""

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict[str, str]] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        return_assistant_tokens_mask: bool = False,
        tokenize: bool = False,
        return_tensors: str | None = None,
        return_dict: bool = False,
        processor_kwargs: dict | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        drop_trailing_turns: bool = False,
        **kwargs,
    ):
        r"""
        Render chat messages (and, with `tokenize=True`, process them with their media), as `ProcessorMixin` does.

        A message is `{"role": "system" | "user" | "assistant", "content": str | list}` (or a message object with
        those fields); content items are `{"type": "text", "text": ...}`, `{"type": "image", "image": ...}`,
        `{"type": "audio", "audio": ...}` (optionally with "sampling_rate") or `{"type": "video", "video": ...}`
        (any form `__call__` accepts; "path" or "url" works as the key too; `"use_audio_in_video": True` on a video
        item reads its file's sound track too, as `use_audio_in_video=True` in the call does for every video). Templates that read a message's content
        as a list of typed items (`DEFAULT_CHAT_TEMPLATE`, VLM templates) get the items; templates that read it as
        one string (a text LM's own: ChatML and the like) get the items joined by spaces, each media item written as
        its placeholder (`<image>` ...), so the media land inside the template's own turns.

        The template is the processor's `chat_template`: the tokenizer's own when it has one, else
        `DEFAULT_CHAT_TEMPLATE` (`role: content</s>\n` per message, `assistant:` as generation prompt); pass
        `chat_template=DEFAULT_CHAT_TEMPLATE` here or when building the processor to use the package's template.

        Returns the rendered string(s) when `tokenize=False`; with `tokenize=True` the `input_ids`, or with
        `return_dict=True` the whole `BatchFeature` of `__call__`, plus `assistant_masks` (batch, seq) marking the
        assistant replies (with their end-of-turn token) when `return_assistant_tokens_mask=True`. Templates with
        `{% generation %}` blocks mark the replies themselves; for others (ChatML) each reply is the text a
        conversation gains from its generation prompt to the end of that reply, rendered prefix by prefix.
        `tools`, `documents`, `continue_final_message` and any template variable (`**kwargs` the template reads)
        go to the template; `processor_kwargs` (and other `**kwargs`) go to `__call__`.
        With `truncation=True, max_length=N, drop_trailing_turns=True`, whole trailing turns (a user message and the
        replies after it) are dropped until each conversation fits; without `drop_trailing_turns` a cut through media
        raises.
        """
        template = self._resolve_chat_template(chat_template)
        variables = _get_template_variables(template)
        template_kwargs = {key: value for key, value in kwargs.items() if key in variables}
        processor_kwargs = {**(processor_kwargs or {}), **{k: v for k, v in kwargs.items() if k not in variables}}
        if return_tensors is not None:
            processor_kwargs["return_tensors"] = return_tensors
        if continue_final_message and (add_generation_prompt or return_assistant_tokens_mask):
            raise ValueError("continue_final_message cannot be combined with add_generation_prompt or return_assistant_tokens_mask")
        conversations, batched = self._normalize_conversations(conversation)
        render = dict(
            template=template, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tools=tools, documents=documents, template_kwargs=template_kwargs,
        )
        if drop_trailing_turns:
            if not (tokenize and truncation and max_length):
                raise ValueError("drop_trailing_turns needs tokenize=True, truncation=True and max_length")
            conversations = [
                self._fit_turns(i, c, render, max_length, processor_kwargs) for i, c in enumerate(conversations)
            ]
        texts, spans, media = self._render(conversations, render, return_assistant_tokens_mask)
        processor_kwargs = self._with_video_track_flags(processor_kwargs, media.pop(TRACK_FLAGS))
        if not tokenize:
            return texts if batched else texts[0]
        bos = self.tokenizer.bos_token
        if bos is not None and all(text.startswith(bos) for text in texts):
            processor_kwargs.setdefault("add_special_tokens", False)  # the template wrote the BOS itself
        processor_kwargs.setdefault("truncation", truncation)
        processor_kwargs.setdefault("max_length", max_length)
        output = self(
            texts,
            images=media["image"],
            audio=media["audio"],
            videos=media["video"],
            return_offsets_mapping=return_assistant_tokens_mask,
            return_text_replacement_offsets=return_assistant_tokens_mask,
            **processor_kwargs,
        )
        if return_assistant_tokens_mask:
            token_offsets, expansions = output.pop("offset_mapping"), output.pop("text_replacement_offsets")
            output["assistant_masks"] = self._assistant_masks(token_offsets, expansions, output["attention_mask"], spans)
        return output if return_dict else output["input_ids"]

    def _render(self, conversations, render: dict, with_spans: bool):
        """Rendered texts, assistant character spans (before placeholder expansion, which happens later), media per sample."""
        media = {kind: [] for kind in (*MODALITIES, TRACK_FLAGS)}
        structured = self._takes_structured_content(render["template"])
        flattened = []
        system_prompt = self.system_prompt
        for index, messages in enumerate(conversations):
            found = {kind: [] for kind in (*MODALITIES, TRACK_FLAGS)}
            clean = []
            for position, message in enumerate(messages):
                if not isinstance(message, dict) or "role" not in message or "content" not in message:
                    raise ValueError(f"conversation {index}, message {position}: expected {{'role': ..., 'content': ...}}")
                content = message["content"]
                if not isinstance(content, str):
                    content = [self._content_item(index, position, item, found) for item in content]
                    if not structured:
                        content = " ".join(item["text"] if item["type"] == "text" else self.placeholder(item["type"]) for item in content)
                clean.append({**message, "content": content})
            if system_prompt is not None and not (clean and clean[0]["role"] == "system"):
                clean.insert(0, {"role": "system", "content": system_prompt})
            flattened.append(clean)
            for kind in (*MODALITIES, TRACK_FLAGS):
                media[kind].append(found[kind])
        texts, spans = self._render_texts(flattened, render)
        if with_spans and not GENERATION_BLOCK.search(render["template"]):
            spans = [self._assistant_spans(index, messages, text, render) for index, (messages, text) in enumerate(zip(flattened, texts))]
        flags = [flag for lists in media.pop(TRACK_FLAGS) for flag in lists]
        media = {kind: (lists if any(lists) else None) for kind, lists in media.items()}
        media[TRACK_FLAGS] = flags if any(flag is not None for flag in flags) else None
        return texts, spans if with_spans else None, media

    @staticmethod
    def _with_video_track_flags(processor_kwargs: dict, flags: list[bool | None] | None) -> dict:
        """`processor_kwargs` with `use_audio_in_video` per video when video items set it themselves: an item's
        own value wins, the call's `use_audio_in_video` (a bool, default False) fills in the others."""
        if flags is None:
            return processor_kwargs
        default = processor_kwargs.get("use_audio_in_video", False)
        if not isinstance(default, bool):
            raise ValueError(
                "use_audio_in_video is set on video items of the messages; the call's use_audio_in_video must then be "
                f"a bool (the default for the other videos), got {default!r}"
            )
        return {**processor_kwargs, "use_audio_in_video": [default if flag is None else flag for flag in flags]}

    def _render_texts(self, conversations, render: dict, add_generation_prompt: bool | None = None):
        return render_jinja_template(
            conversations=conversations,
            tools=render["tools"],
            documents=render["documents"],
            chat_template=render["template"],
            add_generation_prompt=render["add_generation_prompt"] if add_generation_prompt is None else add_generation_prompt,
            continue_final_message=render["continue_final_message"] if add_generation_prompt is None else False,
            return_assistant_tokens_mask=GENERATION_BLOCK.search(render["template"]) is not None,
            **{**self.tokenizer.special_tokens_map, **render["template_kwargs"]},
        )

    def _assistant_spans(self, index: int, messages: list[dict], text: str, render: dict) -> list[tuple[int, int]]:
        """Character spans of the assistant replies of a template without `{% generation %}` blocks (ChatML).

        Reply i spans what the conversation up to it adds to the conversation before it with the generation prompt,
        trailing whitespace left out (the newline after ChatML's `<|im_end|>`). Each of these renderings must be a
        prefix of the full text, which holds for templates that render a turn the same wherever it stands.
        """
        spans = []
        for position, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            (prompt,), _ = self._render_texts([messages[:position]], render, add_generation_prompt=True)
            (upto,), _ = self._render_texts([messages[: position + 1]], render, add_generation_prompt=False)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise ValueError(
                    f"conversation {index}, message {position}: the chat template does not render this conversation as "
                    "a sequence of prefixes, so the assistant reply cannot be located; use a template with "
                    "{% generation %} blocks (e.g. DEFAULT_CHAT_TEMPLATE) for return_assistant_tokens_mask"
                )
            spans.append((len(prompt), len(upto.rstrip())))
        return spans

    def _takes_structured_content(self, template: str) -> bool:
        """Whether `template` reads a message's content as a list of typed items rather than as one string.

        Probed by rendering a one-item list: a string template prints the list's repr (or fails on it).
        """
        probe = "probe-7f3a"
        try:
            (rendered,), _ = render_jinja_template(
                conversations=[[{"role": "user", "content": [{"type": "text", "text": probe}]}]],
                chat_template=template,
                **self.tokenizer.special_tokens_map,
            )
        except Exception:  # a template that cannot take a list (e.g. `content | trim`) takes strings
            return False
        return probe in rendered and "'type'" not in rendered

    def _content_item(self, index: int, position: int, item, found: dict) -> dict:
        """A content item as the template receives it (its media payload collected into `found`)."""
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            return {**item, "text": item.get("text") or ""}
        if kind not in MODALITIES:
            raise ValueError(
                f"conversation {index}, message {position}: unknown content type {kind!r}; "
                f"expected 'text', 'image', 'audio' or 'video'"
            )
        # the first key that holds a value: `datasets` gives every content item every key, None where unused
        value = next((item[key] for key in (kind, "path", "url") if item.get(key) is not None), None)
        if value is None:
            raise ValueError(f"conversation {index}, message {position}: a {kind} item needs a {kind!r} (or 'path') value")
        if kind == "audio" and item.get("sampling_rate") is not None and not isinstance(value, (dict, str, os.PathLike, bytes)):
            # an array's own rate; a file's (path, URL-named file, bytes) is read from its header by `load_audio`
            value = {"array": value, "sampling_rate": item["sampling_rate"]}
        found[kind].append(value)
        if kind == "video":
            flag = item.get("use_audio_in_video")
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"conversation {index}, message {position}: use_audio_in_video must be a bool, got {flag!r}")
            found[TRACK_FLAGS].append(flag)
        return {**item, "type": kind}

    @staticmethod
    def _assistant_masks(token_offsets, expansions, attention_mask, spans) -> torch.Tensor:
        """1 on tokens inside the template's {% generation %} spans, mapped through placeholder expansion.

        `spans` are character spans in the rendered text; `expansions` say where placeholders grew, which moves
        later characters; `token_offsets` are each real token's characters in the expanded text.
        """
        attention_mask = torch.as_tensor(attention_mask)
        masks = torch.zeros_like(attention_mask)
        for sample, (offsets, sample_spans) in enumerate(zip(token_offsets, spans)):
            ends = [entry["span"][1] for entry in expansions[sample]]
            growth = [0]
            for entry in expansions[sample]:
                growth.append(growth[-1] + len(entry["replacement"]) - len(entry["text"]))
            moved = [
                (start + growth[bisect.bisect_right(ends, start)], end + growth[bisect.bisect_right(ends, end - 1)])
                for start, end in sample_spans
            ]
            positions = attention_mask[sample].nonzero().flatten().tolist()  # real tokens, whatever the padding side
            for position, (start, end) in zip(positions, offsets):
                if end > start and any(low <= start < high for low, high in moved):
                    masks[sample, position] = 1
        return masks

    def _fit_turns(self, index, messages, render: dict, max_length, processor_kwargs):
        """Drop whole trailing turns (a user message and everything after it) until the conversation fits.

        The media are decoded once, for the whole conversation: each shorter prefix holds the first items of each
        modality, so its length is that of its rendered text with the same placeholder expansions, tokenized alone.
        """
        (text,), _, media = self._render([messages], render, False)
        processor_kwargs = self._with_video_track_flags(processor_kwargs, media.pop(TRACK_FLAGS))
        skip = ("padding", "return_tensors", "padding_side", "truncation", "max_length", "return_text_replacement_offsets")
        options = {k: v for k, v in processor_kwargs.items() if k not in skip}
        bos = self.tokenizer.bos_token
        options.setdefault("add_special_tokens", not (bos is not None and text.startswith(bos)))  # as the final call
        processed = self(
            [text], images=media["image"], audio=media["audio"], videos=media["video"],
            return_text_replacement_offsets=True, **options,
        )  # fmt: skip
        length = processed["input_ids"].shape[1]
        expansions = {kind: [] for kind in MODALITIES}
        for entry in processed["text_replacement_offsets"][0]:
            expansions[entry["type"]].append(entry["replacement"])
        while length > max_length:
            user_turns = [i for i, message in enumerate(messages) if message["role"] == "user"]
            if len(user_turns) <= 1:
                raise ValueError(
                    f"conversation {index}: its first turn alone takes {length} tokens, more than max_length={max_length}"
                )
            logger.info(f"conversation {index}: dropping its last turn to fit max_length={max_length}")
            messages = messages[: user_turns[-1]]
            (text,), _, media = self._render([messages], render, False)
            kept = {kind: len(media[kind][0]) if media[kind] else 0 for kind in MODALITIES}
            (expanded,), _ = self.get_text_with_replacements(
                [text], expansions["image"][: kept["image"]], expansions["video"][: kept["video"]],
                expansions["audio"][: kept["audio"]],
            )  # fmt: skip
            length = len(self.tokenizer(expanded, add_special_tokens=options["add_special_tokens"])["input_ids"])
        return messages


__all__ = ["ASSISTANT_PREFIX", "DEFAULT_CHAT_TEMPLATE", "ChatTemplateMixin", "with_generation_markers", "with_media_parts_as_placeholders"]


# --- `{% generation %}` markers for an LM's own template ---------------------------------------------
_CONTENT_TERM = re.compile(r"""^message(\[['"]content['"]\]|\.content)$""")
_OUTPUT_BLOCK = re.compile(r"{{-?(.*?)-?}}", re.S)


def _split_concatenation(expression: str) -> list[str]:
    """`'<a>' + message['role'] + '\\n'` -> its `+` terms, splitting only outside quotes and brackets."""
    terms, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(expression):
        if quote:
            if char == quote and expression[index - 1] != "\\":
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "+" and depth == 0:
            terms.append(expression[start:index].strip())
            start = index + 1
    return terms + [expression[start:].strip()]


def _is_whitespace_literal(term: str) -> bool:
    return len(term) >= 2 and term[0] == term[-1] and term[0] in "'\"" and not term[1:-1].replace("\\n", "").strip()


def with_generation_markers(template: str | None) -> str | None:
    """`template` with the assistant's reply wrapped in `{% generation %}` ... `{% endgeneration %}`, as TRL's
    `SFTTrainer(assistant_only_loss=True)` requires (it refuses a template without them unless it knows the
    template); a template that already has them, or None, is returned as is.

    Handles the common form of a text LM's own template (ChatML: SmolLM2, Qwen, ...): one output expression per
    message, a `+` concatenation such as `'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'`.
    For assistant messages that expression is rewritten so the content and the end-of-turn terms after it (up to
    a trailing whitespace literal, such as the newline between turns) are inside the generation block, so the
    reply and its end-of-turn token are trained; other roles render exactly as before. Raises `ValueError` when
    the template has no such expression (then add the markers by hand).
    """
    if template is None or GENERATION_BLOCK.search(template):
        return template
    for match in _OUTPUT_BLOCK.finditer(template):
        terms = _split_concatenation(match.group(1))
        content = [i for i, term in enumerate(terms) if _CONTENT_TERM.match(term)]
        if len(content) != 1:
            continue
        start = content[0]
        end = len(terms)
        while end > start + 1 and _is_whitespace_literal(terms[end - 1]):
            end -= 1  # trailing newlines belong to the turn separator, not the reply
        prefix, reply, suffix = terms[:start], terms[start:end], terms[end:]

        def output(parts):
            return "{{ " + " + ".join(parts) + " }}" if parts else ""

        assistant = output(prefix) + "{% generation %}" + output(reply) + "{% endgeneration %}" + output(suffix)
        rewritten = "{% if message['role'] == 'assistant' %}" + assistant + "{% else %}" + match.group(0) + "{% endif %}"
        return template[: match.start()] + rewritten + template[match.end() :]
    raise ValueError(
        "cannot add {% generation %} markers to this chat template: no single output expression concatenates "
        "message['content'] (add `{% generation %}` ... `{% endgeneration %}` around the assistant reply by hand)"
    )
