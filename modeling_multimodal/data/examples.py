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

import json
import os
import re
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
from ..processing.media_files import open_media_file
from ..processing.video_processing_multimodal import video_file_span
from ..tokenization import MEDIA_TOKENS

# The media tensors an encoded example carries (whichever of them its media need).
MEDIA_TENSOR_KEYS = MEDIA_INPUTS
MANIFEST_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_PLACEHOLDER = re.compile("(" + "|".join(re.escape(token) for token in MEDIA_TOKENS.values()) + ")")
_MODALITY_OF_TOKEN = {token: modality for modality, token in MEDIA_TOKENS.items()}


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
def resolve_media_path(path: str, root: str | os.PathLike, row_id: str) -> str:
    """`path` joined to `root`, normalised; a path that leaves `root` raises a `ValueError` naming the row.

    Symlinks (in `path` and in `root`) are resolved before the check, so a link inside the root that points
    outside it is refused like `..`. The path returned is the normalised joined path, not the link's target.
    """
    if "\x00" in os.fspath(path):
        raise ValueError(f"Row {row_id!r}: media path {path!r} contains a NUL character.")
    root = os.path.normpath(os.path.abspath(root))
    resolved = os.path.normpath(os.path.join(root, os.fspath(path)))
    real_root, real_path = os.path.realpath(root), os.path.realpath(resolved)
    for inside, base in ((resolved, root), (real_path, real_root)):
        if os.path.commonpath([base, inside]) != base:
            target = "" if inside == resolved else f" (a symlink to {real_path!r})"
            raise ValueError(
                f"Row {row_id!r}: media path {path!r}{target} leaves the data root {root!r}; refusing to read it."
            )
    return resolved


def _media_item_key(item: Mapping) -> str | None:
    """The key of a chat content item that holds its media (transformers accepts "image"/"path"/"url"...)."""
    for key in (item.get("type"), "path", "url"):
        if key in item and item[key] is not None:
            return key
    return None


def _resolve_row(row: dict, root, media_columns: list[str]) -> dict:
    row_id = row["id"]

    def resolve(value):
        if isinstance(value, str):
            return resolve_media_path(value, root, row_id)
        if isinstance(value, (list, tuple)):
            return [resolve(v) for v in value]
        return value  # bytes, arrays, decoded images: nothing to resolve

    for column in media_columns:
        row[column] = resolve(row[column])
    if row.get("messages") is not None:
        messages = json.loads(row["messages"]) if isinstance(row["messages"], str) else row["messages"]
        for message in messages:
            if isinstance(message.get("content"), list):
                for item in message["content"]:
                    key = _media_item_key(item) if item.get("type") in MODALITIES else None
                    if key is not None:
                        item[key] = resolve(item[key])
        row["messages"] = json.dumps(messages)  # one Arrow type, whatever mix of string and list contents rows have
    return row


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


def _read_manifest_files(files: list[str], builder: str, cache_dir: str | None) -> datasets.Dataset:
    """`datasets.load_dataset` on manifest files, with the errors a malformed file causes turned into `ValueError`s
    that name it (JSONL lines are checked first, so a bad line is named by its number)."""
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"Manifest {f!r} does not exist (or is not a regular file).")
        if os.path.getsize(f) == 0:
            raise ValueError(f"Manifest {f!r} is empty: it has no rows.")
        if f.lower().endswith(".jsonl"):
            _check_jsonl(f)
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


def _check_required_values(dataset: datasets.Dataset, spec: TaskSpec, source: str) -> None:
    """Each row must hold what its task trains on: its media and its response (or, for retrieval, its pair text)."""
    text_field = spec.response_field or spec.pair_field
    required = list(spec.media_fields.values()) + ([text_field] if text_field else [])
    for column in required:
        for position, value in enumerate(dataset[column]):
            if _missing(value):
                row_id = dataset[position]["id"]
                raise ValueError(
                    f"{source}, row {position} (id {row_id!r}): no {column!r} value, which task {spec.name!r} needs; "
                    "fill it in or drop the row."
                )


def load_manifest(
    source: str | os.PathLike | list | datasets.Dataset,
    root: str | os.PathLike | None = None,
    *,
    task: str | TaskSpec | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """A manifest as a `datasets.Dataset` with an `id` per row and media paths resolved against `root`.

    source: a `.jsonl`/`.json`/`.csv`/`.parquet` file (or a list of files of one format), or a `Dataset`.
    root: the data root media paths are relative to (default: the manifest's folder; required for a Dataset
        whose rows hold paths). Media columns are the task's `media_fields` (or every column named
        image/audio/video) and the media items inside chat `messages`. `messages` may be a list or a JSON
        string (CSV); it comes back as a JSON string, since Arrow cannot hold rows whose contents mix strings and
        lists in one column (`build_example` parses it).
    """
    if isinstance(source, datasets.Dataset):
        dataset, source_name = source, "Manifest (in-memory dataset)"
    else:
        files = [os.fspath(f) for f in (source if isinstance(source, (list, tuple)) else [source])]
        source_name = "Manifest " + ", ".join(map(repr, files))
        suffixes = {Path(f).suffix.lower() for f in files}
        if len(suffixes) != 1 or next(iter(suffixes)) not in MANIFEST_BUILDERS:
            raise ValueError(f"Manifest files {files}: expected one format among {sorted(MANIFEST_BUILDERS)}.")
        builder = MANIFEST_BUILDERS[suffixes.pop()]
        dataset = _read_manifest_files(files, builder, cache_dir)
        root = root if root is not None else os.path.dirname(os.path.abspath(files[0]))
    if "id" not in dataset.column_names:
        dataset = dataset.add_column("id", [str(i) for i in range(len(dataset))])
    elif dataset.features["id"].dtype != "string":
        dataset = dataset.cast_column("id", datasets.Value("string"))

    spec = get_task(task)
    media_columns = list(spec.media_fields.values()) if spec else [m for m in MODALITIES if m in dataset.column_names]
    needed = media_columns + ([c for c in (spec.response_field, spec.pair_field, spec.ctc_field) if c] if spec else [])
    missing = sorted({c for c in needed if c not in dataset.column_names})
    if missing:
        raise ValueError(f"{source_name} has no column(s) {missing} that task {spec.name!r} reads; columns: {dataset.column_names}.")
    if spec is not None:
        _check_required_values(dataset, spec, source_name)
    has_paths = media_columns or "messages" in dataset.column_names
    if has_paths and root is None:
        raise ValueError("load_manifest: pass root= (the folder media paths are relative to) for an in-memory Dataset.")
    if has_paths:
        dataset = dataset.map(_resolve_row, fn_kwargs={"root": root, "media_columns": media_columns}, desc="Resolving media paths")
    return dataset


# --- rows -> examples ------------------------------------------------------------------------------
def _text_of(content) -> str:
    """A message's text: a string, or the text items of a content list joined by spaces."""
    if isinstance(content, str):
        return content
    return " ".join(item["text"] for item in content if item.get("type") == "text")


def _template_content(prompt: str, row: dict, media: dict[str, list], row_id: str, video_tracks: bool = False) -> list[dict]:
    """"<image> describe {x}." -> [{"type": "image", "image": path}, {"type": "text", "text": "describe ..."}].

    With `video_tracks`, video items carry `"use_audio_in_video": True` (their sound track goes in too)."""
    content, used = [], dict.fromkeys(MODALITIES, 0)
    for piece in _PLACEHOLDER.split(prompt):
        if piece in _MODALITY_OF_TOKEN:
            modality = _MODALITY_OF_TOKEN[piece]
            if used[modality] >= len(media[modality]):
                raise ValueError(f"Row {row_id!r}: the prompt has more {piece} than the row has {modality} items.")
            item = {"type": modality, modality: media[modality][used[modality]]}
            content.append({**item, "use_audio_in_video": True} if modality == "video" and video_tracks else item)
            used[modality] += 1
        elif piece.strip():
            try:
                content.append({"type": "text", "text": piece.strip().format_map(row)})
            except KeyError as err:
                raise ValueError(f"Row {row_id!r}: the prompt template needs column {err} the row does not have.") from None
    for modality, count in used.items():
        if count != len(media[modality]):
            raise ValueError(
                f"Row {row_id!r}: {len(media[modality])} {modality} items but {count} placeholders in the prompt."
            )
    return content


def build_example(row: dict, task: str | TaskSpec | None = None) -> dict:
    """One row -> {"id", "prompt" (chat messages), "response" (str or None), "media" {modality: [items]},
    "use_audio_in_video" (one bool per video), "pair_text", "ctc_text"}. Media are collected in placeholder order,
    which is the order the model consumes them. A video content item with `"use_audio_in_video": True` (chat rows,
    or a task with `use_audio_in_video`) brings its sound track.
    """
    spec, row_id = get_task(task), str(row.get("id"))
    if spec is None:
        if row.get("messages") is None:
            raise ValueError(f"Row {row_id!r} has no 'messages'; pass task= to map its fields (tasks: {sorted(TASKS)}).")
        messages = json.loads(row["messages"]) if isinstance(row["messages"], str) else list(row["messages"])
        response = None
        if messages and messages[-1].get("role") == "assistant":
            response = _text_of(messages[-1]["content"])
            messages = messages[:-1]
        pair_text, ctc_text = row.get("pair_text"), row.get("ctc_text")
    else:
        media = {}
        for modality in MODALITIES:
            value = row.get(spec.media_fields[modality]) if modality in spec.media_fields else None
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
                    media[item["type"]].append(item[key])
                    if item["type"] == "video":
                        tracks.append(bool(item.get("use_audio_in_video")))
    return {
        "id": row_id, "prompt": messages, "response": response, "media": media, "use_audio_in_video": tracks,
        "pair_text": pair_text, "ctc_text": ctc_text,
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


class ExampleEncoder:
    """Row -> tensors for `MultimodalCollator` / `PackingCollator`; picklable, runs in DataLoader workers.

    Returns {"id", "input_ids" (L,), "labels" (L,)} plus, when present, "pixel_values" (n, 3, H, W),
    "pixel_values_videos" (n, F, 3, H, W), "input_features" (n, mels, T) + "input_features_mask" (n, T),
    "ctc_labels" (n_audios, S) and "pair_input_ids" (P,).
    """

    def __init__(
        self, processor, task: str | TaskSpec | None = None, max_length: int | None = None, layout=None, augmentation=None
    ):
        self.processor = processor
        self.task = get_task(task)
        self.max_length = max_length
        self.augmentation = augmentation  # an `Augmentation` (training only); applied when called with augment_key
        self.layout = layout if layout is not None else getattr(processor, "layout", None)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _prompt_text(self, example: dict) -> str:
        return self.processor.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)

    def _response_ids(self, example: dict, prompt_text: str) -> list[int]:
        """The response's ids as the chat template writes them (e.g. its leading space), ending with EOS.

        The whole conversation is rendered and the text after the rendered prompt is tokenized on its own; what
        follows the template's EOS (a newline) is dropped, since generation stops at EOS.
        """
        if example["response"] is None:
            return []
        assistant = {"role": "assistant", "content": example["response"]}
        full = self.processor.apply_chat_template(example["prompt"] + [assistant], tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(f"Row {example['id']!r}: the chat template does not render the prompt as a prefix of the chat.")
        response = full[len(prompt_text) :]
        eos = self.tokenizer.eos_token
        if eos in response:
            response = response[: response.rindex(eos)]
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        media_ids = set(self.tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS.values())))
        if media_ids.intersection(ids):
            raise ValueError(f"Row {example['id']!r}: the response contains a media placeholder; only prompts may hold media.")
        return ids + [self.tokenizer.eos_token_id]

    def _process_prompt(self, example: dict, prompt_text: str) -> dict:
        media = example["media"]
        for modality, items in media.items():
            for item in items:
                if isinstance(item, str) and not os.path.isfile(item):
                    problem = "is not a regular file" if os.path.exists(item) else "does not exist"
                    raise ValueError(f"Row {example['id']!r}: {modality} file {item!r} {problem}.")
        tracks = {"use_audio_in_video": example["use_audio_in_video"]} if any(example["use_audio_in_video"]) else {}
        try:
            return self.processor(
                text=[prompt_text], images=media["image"] or None, audio=media["audio"] or None,
                videos=media["video"] or None, return_tensors="pt", **tracks,
            )
        except ValueError as err:  # the processor names the item and its file ("sample 0, image 0 (file '...')")
            raise ValueError(f"Row {example['id']!r}: {err}") from err

    def __call__(self, row: dict, augment_key: tuple[int, int] | None = None) -> dict:
        """The row encoded; with `augment_key` = (epoch, index) and an augmentation, that sample's augmented version."""
        example = build_example(row, self.task)
        plan = None
        if self.augmentation is not None and augment_key is not None:
            plan = self.augmentation.plan(*augment_key)
            example = self.augmentation.rewrite_example(example, plan)
        prompt_text = self._prompt_text(example)
        processed = self._process_prompt(example, prompt_text)
        if plan is not None:
            processed = self.augmentation.transform_tensors(processed, plan)
        prompt_ids = processed["input_ids"][0].tolist()
        response_ids = self._response_ids(example, prompt_text)
        input_ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        if self.max_length is not None and len(input_ids) > self.max_length:
            if len(prompt_ids) >= self.max_length:
                raise ValueError(
                    f"Row {example['id']!r}: its prompt is {len(prompt_ids)} tokens (media included), over max_length="
                    f"{self.max_length}; filter such rows out with estimate_length."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]  # truncate the response only
        encoded = {"id": example["id"], "input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        for key in MEDIA_TENSOR_KEYS:
            if processed.get(key) is not None:
                encoded[key] = processed[key]
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
        """Tokens of the encoded row (prompt with expanded media + response + EOS) without decoding any media."""
        if self.layout is None:
            raise ValueError("estimate_length needs the MediaTokenLayout: pass layout= or a processor with .layout.")
        example = build_example(row, self.task)
        prompt_text = self._prompt_text(example)
        length = len(self.tokenizer(prompt_text)["input_ids"])
        media = example["media"]
        length += len(media["image"]) * (self.layout.image_tokens() - 1)
        extractor = getattr(self.processor, "feature_extractor", None)
        audio_args = {name: getattr(extractor, name) for name in ("sampling_rate", "hop_length", "n_fft")} if extractor else {}
        for item, with_track in zip(media["video"], example["use_audio_in_video"]):
            track_frames = video_track_mel_frames(item, **audio_args) if with_track else 0
            length += self.layout.video_tokens(track_frames) - 1
        for item in media["audio"]:
            if not isinstance(item, str):
                raise ValueError(
                    f"Row {example['id']!r}: estimate_length reads audio lengths from files, got {type(item).__name__}."
                )
            length += self.layout.audio_tokens(audio_mel_frames(item, **audio_args)) - 1
        length += len(self._response_ids(example, prompt_text))
        return length if self.max_length is None else min(length, self.max_length)

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
