"""Examples from data: manifests → rows → examples → tensors, cheap length estimates for batching.

Three steps, each its own small piece:
- `load_manifest`: a JSONL / CSV / Parquet file (or an in-memory `datasets.Dataset`) as a `datasets.Dataset`,
  every row given an `id` and every media path resolved against the data root. A path that leaves the root
  (absolute elsewhere, `..`, or a symlink inside the root whose target is outside it) is refused with a
  `ValueError` naming the row and the path: symlinks are resolved (`os.path.realpath`) before the check.
  A manifest that cannot be used is refused with a `ValueError` naming the file: a JSONL line that is not a
  JSON object (with its line number), no rows at all, or a row missing the text or media its task needs
  (a row without its caption would otherwise train on zero tokens).
- `build_example`: a row → one training example (plain Python, no media decoded). A row is either chat
  `messages` (the last assistant turn is the trained response) or simple fields mapped by a `TaskSpec`
  ("task template"): `image_caption`, `video_caption`, `av_video_caption` (frames and sound track),
  `speech_transcription`, `image_text_pair`.
- `ExampleEncoder`: an example → tensors through the processor. The prompt goes through the chat template
  with `add_generation_prompt=True` and the processor (placeholders expanded, media preprocessed); the
  response is tokenized on its own and its ids (+ EOS) are appended, so the prompt is an exact prefix and
  only response tokens are trained (`labels` = -100 on the prompt, which holds every media placeholder).

With an `Augmentation` (`training/augmentation.py`; training only), `ExampleEncoder(row, augment_key=(epoch, index))`
rewrites the example's text and audio before the processor and transforms its tensors after it.

`ExampleEncoder.estimate_length` gives an example's token count without decoding media (audio length from
the file header), for `LengthGroupedBatchSampler` and packing; it uses the same `MediaTokenLayout` counts
as the processor, so the estimate is exact.

What the encoder needs from the processor (the `MultimodalProcessor` public API): `.tokenizer`,
`.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`, and
`processor(text=[prompt], images=..., audio=..., videos=..., return_tensors="pt")` returning `input_ids`
and the model's media inputs. For length estimates it also reads the processor's `MediaTokenLayout`
(`.layout`, or pass `layout=`) and its feature extractor's `sampling_rate` / `hop_length` / `n_fft`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import av
import datasets
import soundfile
import torch

from ..configuration.media_registry import MEDIA_INPUTS, MODALITIES  # ("image", "audio", "video")
from ..constants import IGNORE_INDEX
from ..processing.audio_loading import mel_frame_count
from ..processing.image_processing_multimodal import image_size_from_header
from ..processing.media_files import open_media_file
from ..processing.video_processing_multimodal import sampled_frame_times, video_file_span
from ..tokenization import MEDIA_TOKENS
from .collator import cat_videos
from .containers import media_value, open_container, undecoded_media
from .formats import FORMATS, ROLES, decode_data_url, detect_format, row_tools, split_at_placeholders, to_messages

# The media tensors an encoded example carries (whichever of them its media need).
MEDIA_TENSOR_KEYS = MEDIA_INPUTS
MANIFEST_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# --- task templates --------------------------------------------------------------------------------
@dataclass
class TaskSpec:
    """How a row of simple fields becomes a chat example.

    prompt: the user turn; `<image>` / `<audio>` / `<video>` mark where each media item goes, `{field}`
        is filled from the row (e.g. "<image> {question}").
    response_field: the column holding the trained response (None: no LM target, e.g. retrieval only).
    media_fields: modality -> column holding one path (or a list of paths, one per placeholder).
    pair_field: column with the text paired with the media for the contrastive loss.
    ctc_field: column with the transcript for the audio CTC loss (an auxiliary task).
    use_audio_in_video: each video's own sound track goes in with its frames (the processor's `use_audio_in_video`).
    """

    name: str
    prompt: str
    response_field: str | None
    media_fields: dict[str, str] = field(default_factory=dict)
    pair_field: str | None = None
    ctc_field: str | None = None
    use_audio_in_video: bool = False

    def __post_init__(self):
        unknown = set(self.media_fields) - set(MODALITIES)
        if unknown:
            raise ValueError(f"TaskSpec {self.name!r}: unknown media modalities {sorted(unknown)}; expected {MODALITIES}.")


TASKS = {
    spec.name: spec
    for spec in (
        TaskSpec("image_caption", "<image> describe the image.", "caption", {"image": "image"}, pair_field="caption"),
        TaskSpec("video_caption", "<video> what happens in the video?", "caption", {"video": "video"}, pair_field="caption"),
        # The video's own sound track goes in with its frames (the demo's clips say the colour the frames do not show).
        TaskSpec(
            "av_video_caption", "<video> what happens in the video?", "caption", {"video": "video"}, pair_field="caption",
            use_audio_in_video=True,
        ),
        TaskSpec(
            "speech_transcription", "<audio> what is said in the audio?", "transcript", {"audio": "audio"},
            pair_field="transcript", ctc_field="transcript",
        ),
        # Retrieval only: the image alone, no LM target; the row trains the contrastive loss (and nothing else).
        TaskSpec("image_text_pair", "<image>", None, {"image": "image"}, pair_field="caption"),
    )
}


def get_task(task: str | TaskSpec | None) -> TaskSpec | None:
    """A built-in task by name (a `TaskSpec` passes through; None means rows carry chat `messages`)."""
    if task is None or isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; built-in tasks are {sorted(TASKS)} (or pass a TaskSpec).")
    return TASKS[task]


# --- manifests -------------------------------------------------------------------------------------
def resolve_media_path(path: str, root: str | os.PathLike, row_id: str, allowed_roots=()) -> str:
    """`path` joined to `root`, normalised; a path outside `root` and every `allowed_roots` folder raises a `ValueError`
    naming the row.

    Symlinks (in `path` and in the roots) are resolved before the check, so a link inside a root that points
    outside every root is refused like `..`; an absolute path inside a listed root (`data.media_roots`, a LLaVA
    image folder) is accepted. The path returned is the normalised joined path, not the link's target.
    """
    if "\x00" in os.fspath(path):
        raise ValueError(f"Row {row_id!r}: media path {path!r} contains a NUL character.")
    root = os.path.normpath(os.path.abspath(root))
    resolved = os.path.normpath(os.path.join(root, os.fspath(path)))
    real_path = os.path.realpath(resolved)
    roots = [root, *(os.path.normpath(os.path.abspath(r)) for r in allowed_roots)]

    def inside(candidate: str, base: str) -> bool:
        return os.path.commonpath([base, candidate]) == base

    for base in roots:
        if inside(resolved, base) and inside(real_path, os.path.realpath(base)):
            return resolved
    lexically = any(inside(resolved, base) for base in roots)
    target = f" (a symlink to {real_path!r})" if lexically else ""
    where = f"the data root {root!r}" if len(roots) == 1 else f"every allowed media root {roots}"
    raise ValueError(f"Row {row_id!r}: media path {path!r}{target} leaves {where}; refusing to read it.")


def _media_item_key(item: Mapping) -> str | None:
    """The key of a chat content item that holds its media (transformers accepts "image"/"path"/"url"...)."""
    for key in (item.get("type"), "path", "url"):
        if key in item and item[key] is not None:
            return key
    return None


def _resolve_row(row: dict, root, media_columns: list[str], allowed_roots=(), source: str = "Manifest") -> dict:
    row_id = row["id"]

    def resolve(value):
        if isinstance(value, str):
            if value.startswith("data:"):
                return value  # inline media (OpenAI data: URLs): nothing on disk to check
            return resolve_media_path(value, root, row_id, allowed_roots)
        if isinstance(value, (list, tuple)):
            return [resolve(v) for v in value]
        value = media_value(value)  # an undecoded {bytes, path} cell: its bytes (or its path, resolved)
        return resolve(value) if isinstance(value, str) else value  # bytes, arrays, decoded images: nothing to resolve

    for column in media_columns:
        row[column] = resolve(row[column])
    if row.get("messages") is not None:
        messages = row["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{source}, row {row_id!r}: 'messages' is not valid JSON ({err.msg} at column {err.colno})."
                ) from None
        for message in messages:
            if isinstance(message.get("content"), list):
                for item in message["content"]:
                    key = _media_item_key(item) if item.get("type") in MODALITIES else None
                    if key is not None:
                        item[key] = resolve(item[key])
        row["messages"] = json.dumps(messages)  # one Arrow type, whatever mix of string and list contents rows have
    return row


def _normalize_chat_row(row: dict, fmt, source: str, media_root, image_folder, data_root) -> dict:
    """A LLaVA / ShareGPT / OpenAI / HF chat row as the internal `messages` (JSON) and `tools` (JSON or "").

    Relative media paths are joined to `media_root`, else (LLaVA rows) `image_folder`, else the data root."""
    where = f"{source}, row {row['id']!r}"
    tools = row_tools(row, where)
    fmt = fmt or detect_format(row)
    root = media_root or (image_folder if fmt == "llava" else None) or data_root
    return {"messages": json.dumps(to_messages(row, fmt, where, root)), "tools": json.dumps(tools) if tools else ""}


CHAT_COLUMNS = ("conversations", "messages", "images", "audios", "videos", "system", "tools", *MODALITIES)


def _check_jsonl(path: str) -> None:
    """Every non-blank line of a JSONL manifest must be a JSON object, and there must be one; else a `ValueError`
    naming the file (and the line)."""
    rows = 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"Manifest {path!r}, line {number}: not valid JSON ({err.msg} at column {err.colno}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"Manifest {path!r}, line {number}: expected a JSON object (one row), got {type(row).__name__}.")
    if rows == 0:
        raise ValueError(f"Manifest {path!r} has no rows (only blank lines).")


def _read_manifest_files(files: list[str], builder: str, cache_dir: str | None, streaming: bool = False):
    """`datasets.load_dataset` on manifest files, with the errors a malformed file causes turned into `ValueError`s
    that name it (JSONL lines are checked first, so a bad line is named by its number). Streamed (an
    `IterableDataset`), nothing is read up front: a malformed line is found when it is read."""
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"Manifest {f!r} does not exist (or is not a regular file).")
        if os.path.getsize(f) == 0:
            raise ValueError(f"Manifest {f!r} is empty: it has no rows.")
        if f.lower().endswith(".jsonl") and not streaming:
            _check_jsonl(f)
    if streaming:
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as err:
        if "corresponds to no data" in str(err):  # datasets' words for a split without rows
            raise ValueError(f"Manifest {', '.join(map(repr, files))} has no rows.") from err
        cause = err.__cause__ or err  # DatasetGenerationError wraps the parser's error
        raise ValueError(f"Manifest {', '.join(map(repr, files))} cannot be read as {builder}: {cause or type(cause).__name__}") from err
    if len(dataset) == 0:
        raise ValueError(f"Manifest {', '.join(map(repr, files))} has no rows.")
    return dataset


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, (list, tuple)) and not value)


def _required_columns(spec: TaskSpec) -> list[str]:
    """What a task trains on: its media and its response (or, for retrieval, its pair text)."""
    text_field = spec.response_field or spec.pair_field
    return list(spec.media_fields.values()) + ([text_field] if text_field else [])


def _missing_value_error(spec: TaskSpec, source: str, position: int, row_id, column: str) -> ValueError:
    return ValueError(
        f"{source}, row {position} (id {row_id!r}): no {column!r} value, which task {spec.name!r} needs; "
        "fill it in or drop the row."
    )


def _check_required_values(dataset: datasets.Dataset, spec: TaskSpec, source: str) -> None:
    """Each row must hold what its task trains on (`_required_columns`)."""
    for column in _required_columns(spec):
        for position, value in enumerate(dataset[column]):
            if _missing(value):
                raise _missing_value_error(spec, source, position, dataset[position]["id"], column)


def _check_row_values(row: dict, position: int, spec: TaskSpec, source: str) -> dict:
    """`_check_required_values` for one streamed row, as it is read (a `map` that changes nothing)."""
    for column in _required_columns(spec):
        if _missing(row.get(column)):
            raise _missing_value_error(spec, source, position, row.get("id"), column)
    return {}


def _streamed_id(row: dict, position: int) -> dict:
    """A streamed row's `id`: its own, as a string, else its position in the stream."""
    return {"id": str(position) if row.get("id") is None else str(row["id"])}


def _stream_columns(dataset: datasets.IterableDataset, source: str) -> list[str]:
    """A streamed data set's columns: from its features, else from its first row (JSON files declare none)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    for row in dataset.take(1):
        return list(row)
    raise ValueError(f"{source} has no rows.")


def load_manifest(
    source,
    root: str | os.PathLike | None = None,
    *,
    task: str | TaskSpec | None = None,
    cache_dir: str | None = None,
    format: str | None = None,  # noqa: A002 - the recipe's word
    media_root: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    media_roots=(),
    split: str = "train",
    streaming: bool = False,
):
    """A manifest as a `datasets.Dataset` with an `id` per row and media paths resolved against `root`.

    source: a `.jsonl`/`.json`/`.csv`/`.parquet` file (or a list of files of one format), an `.arrow` file, a
        `save_to_disk` folder, or an in-memory `Dataset` / `DatasetDict` (`split` picks the split;
        `data/containers.py`). `Image()` / `Audio()` / `Video()` columns are read undecoded ({bytes, path}).
    root: the data root media paths are relative to (default: the manifest's folder; required for a Dataset
        whose rows hold paths). Media columns are the task's `media_fields` (or every column named
        image/audio/video) and the media items inside chat `messages`.
    format: how chat rows are laid out (`data/formats.py`: llava, sharegpt, openai, messages; `fields` for a
        task template); None detects it from each row. Chat rows come back as the internal `messages` (a JSON
        string, since Arrow cannot hold rows whose contents mix strings and lists in one column) and `tools`.
    media_root: the folder every chat row's relative media paths are relative to (default `root`).
    image_folder: the same for LLaVA rows only (`data.image_folder`: LLaVA's `image` names a file in it).
    media_roots: further folders media may come from (absolute paths inside them are accepted); a path outside
        `root`, `media_root` and every one of these is refused, symlinks resolved first.
    streaming: read the rows as they are needed (a `datasets.IterableDataset`, also what an `IterableDataset`
        source gives): nothing is indexed or checked up front; each row is normalised, checked and resolved
        exactly as above when it is read, and a bad row raises then, named the same way.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format!r}: expected one of {FORMATS}.")
    opened = open_container(source, split, streaming)
    if opened is not None:
        dataset, source_name = opened
        if root is None and isinstance(source, (str, os.PathLike)):
            root = os.path.dirname(os.path.abspath(os.fspath(source)))
    else:
        files = [os.fspath(f) for f in (source if isinstance(source, (list, tuple)) else [source])]
        source_name = "Manifest " + ", ".join(map(repr, files))
        suffixes = {Path(f).suffix.lower() for f in files}
        if len(suffixes) != 1 or next(iter(suffixes)) not in MANIFEST_BUILDERS:
            raise ValueError(
                f"Manifest files {files}: expected one format among {sorted(MANIFEST_BUILDERS)}, an .arrow file or a "
                "save_to_disk folder."
            )
        builder = MANIFEST_BUILDERS[suffixes.pop()]
        dataset = _read_manifest_files(files, builder, cache_dir, streaming)
        root = root if root is not None else os.path.dirname(os.path.abspath(files[0]))
    streamed = isinstance(dataset, datasets.IterableDataset)
    if not streamed and len(dataset) == 0:
        raise ValueError(f"{source_name} has no rows.")
    dataset = undecoded_media(dataset)
    columns = _stream_columns(dataset, source_name) if streamed else dataset.column_names
    if streamed:
        dataset = dataset.map(_streamed_id, with_indices=True)
        columns = list(dict.fromkeys([*columns, "id"]))
    elif "id" not in columns:
        dataset = dataset.add_column("id", [str(i) for i in range(len(dataset))])
        columns = dataset.column_names
    elif dataset.features["id"].dtype != "string":
        dataset = dataset.cast_column("id", datasets.Value("string"))

    spec = get_task(task)
    if spec is not None and format not in (None, "fields"):
        raise ValueError(f"{source_name}: task {spec.name!r} maps simple fields; it cannot be combined with format={format!r}.")
    chat = spec is None and format != "fields" and bool({"messages", "conversations"} & set(columns))
    allowed_roots = [r for r in (media_root, image_folder, *media_roots) if r is not None]
    if chat:
        absolute = {name: os.path.abspath(value) if value is not None else None for name, value in
                    (("media_root", media_root), ("image_folder", image_folder), ("data_root", root))}
        removed = [c for c in CHAT_COLUMNS if c in columns]
        dataset = dataset.map(
            _normalize_chat_row, fn_kwargs={"fmt": format, "source": source_name, **absolute},
            remove_columns=removed, **_progress(streamed, "Reading chat rows"),
        )
        columns = [c for c in columns if c not in removed] + ["messages", "tools"]
    media_columns = list(spec.media_fields.values()) if spec else [m for m in MODALITIES if m in columns]
    needed = media_columns + ([c for c in (spec.response_field, spec.pair_field, spec.ctc_field) if c] if spec else [])
    missing = sorted({c for c in needed if c not in columns})
    if missing:
        raise ValueError(f"{source_name} has no column(s) {missing} that task {spec.name!r} reads; columns: {columns}.")
    if spec is not None and streamed:
        dataset = dataset.map(_check_row_values, with_indices=True, fn_kwargs={"spec": spec, "source": source_name})
    elif spec is not None:
        _check_required_values(dataset, spec, source_name)
    has_paths = media_columns or "messages" in columns
    if has_paths and root is None:
        raise ValueError("load_manifest: pass root= (the folder media paths are relative to) for an in-memory Dataset.")
    if has_paths:
        dataset = dataset.map(
            _resolve_row,
            fn_kwargs={"root": root, "media_columns": media_columns, "allowed_roots": allowed_roots, "source": source_name},
            **_progress(streamed, "Resolving media paths"),
        )
    return dataset


def _progress(streamed: bool, text: str) -> dict:
    """`map`'s progress description where the data set takes one (a `Dataset`; an `IterableDataset` does not)."""
    return {} if streamed else {"desc": text}


# --- rows -> examples ------------------------------------------------------------------------------
def _text_of(content) -> str:
    """A message's text: a string, or the text items of a content list joined by spaces."""
    if isinstance(content, str):
        return content
    return " ".join(item["text"] for item in content if item.get("type") == "text")


def _template_content(prompt: str, row: dict, media: dict[str, list], row_id: str, video_tracks: bool = False) -> list[dict]:
    """"<image> describe {x}." -> [{"type": "image", "image": path}, {"type": "text", "text": "describe ..."}].

    With `video_tracks`, video items carry `"use_audio_in_video": True` (their sound track goes in too)."""
    used = dict.fromkeys(MODALITIES, 0)
    content = split_at_placeholders(prompt, media, used, f"Row {row_id!r}")
    for item in content:
        if item["type"] == "text":
            try:
                item["text"] = item["text"].format_map(row)
            except KeyError as err:
                raise ValueError(f"Row {row_id!r}: the prompt template needs column {err} the row does not have.") from None
        elif item["type"] == "video" and video_tracks:
            item["use_audio_in_video"] = True
    for modality, count in used.items():
        if count != len(media[modality]):
            raise ValueError(
                f"Row {row_id!r}: {len(media[modality])} {modality} items but {count} placeholders in the prompt."
            )
    return content


def build_example(row: dict, task: str | TaskSpec | None = None, require_response: bool = True) -> dict:
    """One row -> {"id", "prompt" (chat messages), "response" (str or None), "media" {modality: [items]},
    "use_audio_in_video" (one bool per video), "pair_text", "ctc_text"}. Media are collected in placeholder order,
    which is the order the model consumes them. A video content item with `"use_audio_in_video": True` (chat rows,
    or a task with `use_audio_in_video`) brings its sound track. `require_response=False` accepts a chat row that
    ends on the user's turn (a prompt to score elsewhere, as multiple choice does); training always needs a reply.
    """
    spec, row_id = get_task(task), str(row.get("id"))
    if spec is None:
        if row.get("messages") is None:
            raise ValueError(f"Row {row_id!r} has no 'messages'; pass task= to map its fields (tasks: {sorted(TASKS)}).")
        messages = json.loads(row["messages"]) if isinstance(row["messages"], str) else list(row["messages"])
        for position, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise ValueError(
                    f"Row {row_id!r}, message {position}: unknown role {message.get('role')!r}; expected one of {list(ROLES)} "
                    "(ShareGPT's human/gpt: load the rows with format: sharegpt)."
                )
        pair_text, ctc_text = row.get("pair_text"), row.get("ctc_text")
        response = None
        if messages and messages[-1].get("role") == "assistant":
            response = _text_of(messages[-1]["content"])
            messages = messages[:-1]
        elif not pair_text and require_response:
            raise ValueError(
                f"Row {row_id!r}: the conversation does not end with an assistant turn, so it has nothing to train on; "
                "end it with the assistant's reply (or give a pair_text for the contrastive loss)."
            )
    else:
        media = {}
        for modality in MODALITIES:
            value = media_value(row.get(spec.media_fields[modality])) if modality in spec.media_fields else None
            media[modality] = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        messages = [{"role": "user", "content": _template_content(spec.prompt, row, media, row_id, spec.use_audio_in_video)}]
        response = row.get(spec.response_field) if spec.response_field else None
        if spec.response_field and _missing(response):
            raise ValueError(f"Row {row_id!r}: no {spec.response_field!r} value, which task {spec.name!r} trains on.")
        pair_text = row.get(spec.pair_field) if spec.pair_field else None
        ctc_text = row.get(spec.ctc_field) if spec.ctc_field else None
    if not messages:
        raise ValueError(f"Row {row_id!r}: no prompt turns before the response.")
    media, tracks = {modality: [] for modality in MODALITIES}, []
    for message in messages:
        if isinstance(message.get("content"), list):
            for item in message["content"]:
                if item.get("type") in MODALITIES:
                    key = _media_item_key(item)
                    if key is None:
                        raise ValueError(f"Row {row_id!r}: a {item['type']} content item has no path/data: {item}.")
                    value = item[key]
                    if isinstance(value, str) and value.startswith("data:"):
                        value = decode_data_url(value, f"Row {row_id!r}")
                    media[item["type"]].append(value)
                    if item["type"] == "video":
                        tracks.append(bool(item.get("use_audio_in_video")))
    return {
        "id": row_id, "prompt": messages, "response": response, "media": media, "use_audio_in_video": tracks,
        "pair_text": pair_text, "ctc_text": ctc_text, "tools": json.loads(row["tools"]) if row.get("tools") else None,
    }


# --- examples -> tensors ---------------------------------------------------------------------------
def audio_mel_frames(path: str, sampling_rate: int = 16_000, hop_length: int = 160, n_fft: int = 400) -> int:
    """Mel frames the processor makes of an audio file, from its header only (no decoding).

    The processor resamples to `sampling_rate` (exactly round(n * target / source) samples), pads clips shorter
    than one FFT window to `n_fft`, and makes `samples // hop_length` frames (Whisper: 100 per second).
    """
    with open_media_file(path, f"audio file {path!r}") as source:  # a regular file: a FIFO would block the header read
        try:
            info = soundfile.info(source)
            samples = round(info.frames * sampling_rate / info.samplerate)
        except Exception:  # noqa: BLE001 - not a libsndfile format: ask ffmpeg for the duration
            source.seek(0)
            with av.open(source) as container:
                stream = container.streams.audio[0]
                seconds = float(stream.duration * stream.time_base) if stream.duration else container.duration / av.time_base
            samples = round(seconds * sampling_rate)
    return mel_frame_count(samples, hop_length, n_fft)


def video_track_mel_frames(path: str, sampling_rate: int = 16_000, hop_length: int = 160, n_fft: int = 400) -> int:
    """Mel frames the processor makes of a video file's sound track (`use_audio_in_video`), from its packets only.

    The track is fitted to the span of the frames (`video_file_span`), so its length is that span's.
    """
    if not isinstance(path, str):
        raise ValueError(f"estimate_length reads video spans from files, got {type(path).__name__}.")
    return mel_frame_count(round(video_file_span(path) * sampling_rate), hop_length, n_fft)


ASSISTANT_TURNS = ("all", "last")


def audio_item_mel_frames(item, row_id: str, sampling_rate: int = 16_000, hop_length: int = 160, n_fft: int = 400) -> int:
    """`audio_mel_frames` for any audio item a row may hold: a path, bytes, or a decoded {array, sampling_rate}."""
    if isinstance(item, str):
        return audio_mel_frames(item, sampling_rate, hop_length, n_fft)
    if isinstance(item, (bytes, bytearray, memoryview)):
        info = soundfile.info(io.BytesIO(bytes(item)))
        return mel_frame_count(round(info.frames * sampling_rate / info.samplerate), hop_length, n_fft)
    if isinstance(item, Mapping) and item.get("array") is not None:
        source_rate = item.get("sampling_rate") or sampling_rate
        samples = len(item["array"][0]) if hasattr(item["array"][0], "__len__") else len(item["array"])
        return mel_frame_count(round(samples * sampling_rate / source_rate), hop_length, n_fft)
    raise ValueError(
        f"Row {row_id!r}: estimate_length reads audio lengths from a path, bytes or an {{array, sampling_rate}} dict, "
        f"got {type(item).__name__}."
    )


def _merge_media(outputs: list[dict]) -> dict:
    """The media tensors of several processor calls (one per prompt segment with media) as one example's,
    items in order; feature tensors of different lengths are right-padded with zeros (their masks mark the frames)."""
    merged = {}
    for key in MEDIA_TENSOR_KEYS:
        tensors = [out[key] for out in outputs if out.get(key) is not None]
        if not tensors:
            continue
        if key == "pixel_values_videos":
            merged[key] = cat_videos(tensors)
            continue
        if len(tensors) > 1 and len({t.shape[1:] for t in tensors}) > 1:
            width = max(t.shape[-1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tensors]
        merged[key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return merged


class ExampleEncoder:
    """Row -> tensors for `MultimodalCollator` / `PackingCollator`; picklable, runs in DataLoader workers.

    Returns {"id", "input_ids" (L,), "labels" (L,)} plus, when present, "pixel_values" (n, 3, H, W),
    "pixel_values_videos" (n, F, 3, H, W), "input_features" (n, mels, T) + "input_features_mask" (n, T),
    "ctc_labels" (n_audios, S) and "pair_input_ids" (P,).
    """

    def __init__(
        self, processor, task: str | TaskSpec | None = None, max_length: int | None = None, layout=None, augmentation=None,
        assistant_turns: str = "all",
    ):
        if assistant_turns not in ASSISTANT_TURNS:
            raise ValueError(f"assistant_turns={assistant_turns!r}: expected one of {ASSISTANT_TURNS}.")
        self.processor = processor
        self.task = get_task(task)
        self.max_length = max_length
        self.augmentation = augmentation  # an `Augmentation` (training only); applied when called with augment_key
        self.layout = layout if layout is not None else getattr(processor, "layout", None)
        self.assistant_turns = assistant_turns  # "all": every assistant reply is trained; "last": the final one only

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _render(self, example: dict, messages: list[dict], generation: bool) -> str:
        tools = {"tools": example["tools"]} if example.get("tools") else {}
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False, **tools)

    def _prompt_text(self, example: dict) -> str:
        return self._render(example, example["prompt"], True)

    def _segments(self, example: dict) -> list[tuple[str, str]]:
        """The rendered conversation as [("prompt" | "assistant", text)], cut at each trained assistant reply.

        Reply i is the text the conversation up to it adds to the conversation before it with the generation
        prompt (as the LM's own chat template writes it), up to the template's EOS; the EOS id is appended when
        encoding, since generation stops there. Earlier replies are trained too with `assistant_turns="all"`
        (LLaVA, LLaMA-Factory and TRL's assistant masks), else they stay in the (untrained) prompt.
        """
        messages = list(example["prompt"])
        if example["response"] is None:
            return [("prompt", self._prompt_text(example))]
        messages.append({"role": "assistant", "content": example["response"]})
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = trained if self.assistant_turns == "all" else trained[-1:]
        segments, done, eos = [], "", self.tokenizer.eos_token
        for index in trained:
            prompt = self._render(example, messages[:index], True)
            full = self._render(example, messages[: index + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    f"Row {example['id']!r}: the chat template does not render the conversation as a sequence of prefixes "
                    f"(at message {index}), so its assistant replies cannot be located."
                )
            reply = full[len(prompt):]
            ends = eos is not None and eos in reply
            reply = reply[: reply.rindex(eos)] if ends else reply
            segments += [("prompt", prompt[len(done):]), ("assistant", reply)]
            done = prompt + reply + (eos if ends else "")
        return segments

    def _reply_ids(self, example: dict, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        media_ids = set(self.tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS.values())))
        if media_ids.intersection(ids):
            raise ValueError(f"Row {example['id']!r}: an assistant reply contains a media placeholder; only prompts may hold media.")
        return ids + [self.tokenizer.eos_token_id]

    @staticmethod
    def _media_counts(text: str) -> dict[str, int]:
        return {modality: text.count(token) for modality, token in MEDIA_TOKENS.items()}

    def _split_media(self, example: dict, segments: list[tuple[str, str]]) -> list[tuple[dict, list]]:
        """Each segment's media items (and video track flags), taken in order by its placeholders."""
        taken, track_at, out = dict.fromkeys(MODALITIES, 0), 0, []
        for kind, text in segments:
            counts = self._media_counts(text) if kind == "prompt" else dict.fromkeys(MODALITIES, 0)
            media = {m: example["media"][m][taken[m] : taken[m] + counts[m]] for m in MODALITIES}
            tracks = example["use_audio_in_video"][track_at : track_at + counts["video"]]
            for m in MODALITIES:
                taken[m] += counts[m]
            track_at += counts["video"]
            out.append((media, tracks))
        for m in MODALITIES:
            if taken[m] != len(example["media"][m]):
                raise ValueError(
                    f"Row {example['id']!r}: {len(example['media'][m])} {m} item(s) but {taken[m]} {MEDIA_TOKENS[m]} "
                    "placeholder(s) in the rendered conversation."
                )
        return out

    def _process_prompt(self, example: dict, prompt_text: str, media: dict, tracks: list, first: bool) -> dict:
        for modality, items in media.items():
            for item in items:
                if isinstance(item, str) and not os.path.isfile(item):
                    problem = "is not a regular file" if os.path.exists(item) else "does not exist"
                    raise ValueError(f"Row {example['id']!r}: {modality} file {item!r} {problem}.")
        options = {"use_audio_in_video": tracks} if any(tracks) else {}
        if not first:
            options["add_special_tokens"] = False  # the BOS opens the conversation only
        try:
            return self.processor(
                text=[prompt_text], images=media["image"] or None, audio=media["audio"] or None,
                videos=media["video"] or None, return_tensors="pt", **options,
            )
        except ValueError as err:  # the processor names the item and its file ("sample 0, image 0 (file '...')")
            raise ValueError(f"Row {example['id']!r}: {err}") from err

    def _fit(self, example: dict, pieces: list[tuple[int, bool, bool]]) -> list[int]:
        """How many tokens of each (length, trained, has_media) piece fit `max_length`: a piece with media is kept
        whole or dropped with all after it (a media item's tokens are never cut); text is cut at the limit."""
        if self.max_length is None:
            return [length for length, _, _ in pieces]
        kept, total = [], 0
        for length, _, has_media in pieces:
            room = self.max_length - total
            if length <= room:
                kept.append(length)
                total += length
                continue
            if not has_media and room > 0:
                kept.append(room)
            break
        trained = sum(n for n, (_, is_reply, _) in zip(kept, pieces) if is_reply)
        if any(is_reply for _, is_reply, _ in pieces) and trained == 0:
            raise ValueError(
                f"Row {example['id']!r}: its prompt is {pieces[0][0]} tokens (media included), over max_length="
                f"{self.max_length}; filter such rows out with estimate_length."
            )
        return kept

    def __call__(self, row: dict, augment_key: tuple[int, int] | None = None) -> dict:
        """The row encoded; with `augment_key` = (epoch, index) and an augmentation, that sample's augmented version."""
        example = build_example(row, self.task)
        plan = None
        if self.augmentation is not None and augment_key is not None:
            plan = self.augmentation.plan(*augment_key)
            example = self.augmentation.rewrite_example(example, plan)
        segments = self._segments(example)
        pieces, processed = [], []  # (ids, trained, processor output or None)
        for position, ((kind, text), (media, tracks)) in enumerate(zip(segments, self._split_media(example, segments))):
            if kind == "assistant":
                pieces.append((self._reply_ids(example, text), True, None))
            elif position == 0 or any(media.values()):
                out = self._process_prompt(example, text, media, tracks, first=position == 0)
                if plan is not None:
                    out = self.augmentation.transform_tensors(out, plan)
                pieces.append((out["input_ids"][0].tolist(), False, out if any(media.values()) else None))
            else:
                pieces.append((self.tokenizer(text, add_special_tokens=False)["input_ids"], False, None))
        kept = self._fit(example, [(len(ids), trained, out is not None) for ids, trained, out in pieces])
        input_ids, labels = [], []
        for n, (ids, trained, out) in zip(kept, pieces):
            input_ids += ids[:n]
            labels += ids[:n] if trained else [IGNORE_INDEX] * n
            if out is not None:
                processed.append(out)
        encoded = {"id": example["id"], "input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        encoded.update(_merge_media(processed))
        n_audios = len(example["media"]["audio"])
        if example["ctc_text"]:  # one row per audio clip
            if n_audios != 1:
                raise ValueError(f"Row {example['id']!r}: a CTC transcript needs exactly one audio clip, the row has {n_audios}.")
            encoded["ctc_labels"] = torch.tensor([self._text_ids(example["ctc_text"])])
        if example["pair_text"]:
            encoded["pair_input_ids"] = torch.tensor(self._text_ids(example["pair_text"]))
        return encoded

    def _text_ids(self, text: str) -> list[int]:
        """Plain text (a transcript, a pair text) as LM token ids, without special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- cheap lengths --------------------------------------------------------------------------
    def estimate_length(self, row: dict) -> int:
        """Tokens of the encoded row (prompts with expanded media + trained replies + EOS) without decoding any media;
        the same pieces and the same `max_length` fit as `__call__`, so the estimate is exact."""
        if self.layout is None:
            raise ValueError("estimate_length needs the MediaTokenLayout: pass layout= or a processor with .layout.")
        example = build_example(row, self.task)
        segments = self._segments(example)
        pieces = []
        for position, ((kind, text), (media, tracks)) in enumerate(zip(segments, self._split_media(example, segments))):
            if kind == "assistant":
                pieces.append((len(self._reply_ids(example, text)), True, False))
                continue
            text, extra = self._media_extra_tokens(example, text, media, tracks)
            length = len(self.tokenizer(text, add_special_tokens=position == 0)["input_ids"])
            pieces.append((length + extra, False, any(media.values())))
        return sum(self._fit(example, pieces))

    def _media_extra_tokens(self, example: dict, text: str, media: dict, tracks: list) -> tuple[str, int]:
        """(the text, tokens the media items add beyond their one placeholder each), from headers only. With
        `video_timestamps` each video's placeholder is expanded in the text instead (its time text is tokenized with
        the text around it, as the processor's is), and adds nothing more."""
        extractor = getattr(self.processor, "feature_extractor", None)
        audio_args = {name: getattr(extractor, name) for name in ("sampling_rate", "hop_length", "n_fft")} if extractor else {}
        layout = self.layout
        extra = 0
        for item in media["image"]:  # tiled, an image's tokens follow its size (read from the header)
            grid = layout.image_tile_grid(*image_size_from_header(item)) if layout.image_max_tiles else None
            extra += layout.image_tokens(grid) - 1
        replacements = []
        for item, with_track in zip(media["video"], tracks):
            track_frames = video_track_mel_frames(item, **audio_args) if with_track else 0
            times = None
            if layout.video_fps is not None or layout.video_timestamps:  # a rate's frame count, or the frames' times
                fps = layout.video_fps if layout.video_fps is not None else getattr(self.processor.video_processor, "fps", None)
                multiple = layout.video_temporal_pool_stride if layout.video_fps is not None else None
                times = sampled_frame_times(item, layout.video_num_frames, fps, multiple)
            frames = None if layout.video_fps is None else len(times)
            replacements.append(self.processor.video_replacement(track_frames, frames, times))
            extra += 0 if layout.video_timestamps else layout.video_tokens(track_frames, frames) - 1
        if layout.video_timestamps and replacements:
            parts = text.split(self.processor.placeholder("video"))
            text = parts[0] + "".join(replacement + part for replacement, part in zip(replacements, parts[1:]))
        for item in media["audio"]:
            extra += self.layout.audio_tokens(audio_item_mel_frames(item, example["id"], **audio_args)) - 1
        return text, extra

    def estimate_lengths(self, dataset) -> list[int]:
        """`estimate_length` of every row, in order."""
        return [self.estimate_length(row) for row in dataset]


class EncodedDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` (or any indexable of rows) encoded on access by an `ExampleEncoder`."""

    def __init__(self, rows, encoder: ExampleEncoder):
        self.rows, self.encoder = rows, encoder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.encoder(self.rows[int(index)])

    def augmented(self, index: int, epoch: int, sample: int) -> dict:
        """Row `index` encoded as training sample `sample` of `epoch` (its own augmentation draw)."""
        return self.encoder(self.rows[int(index)], augment_key=(epoch, sample))


__all__ = [
    "TASKS",
    "EncodedDataset",
    "ExampleEncoder",
    "TaskSpec",
    "audio_mel_frames",
    "video_track_mel_frames",
    "build_example",
    "get_task",
    "load_manifest",
    "resolve_media_path",
]
