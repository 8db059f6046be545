"""Data containers users already have -> one `datasets.Dataset` of rows: in-memory objects, `save_to_disk` folders,
Arrow files, and media columns (`Image()`, `Audio()`, `Video()`, `{bytes, path}` rows) without torchcodec.

- `open_container(source, split, streaming)`: a `datasets.Dataset` as is; a `DatasetDict` (or a `save_to_disk`
  folder of one) by its `split`; a `save_to_disk` folder of a Dataset; an `.arrow` file; an `IterableDataset` /
  `IterableDatasetDict` as is (rows read as they are needed). With `streaming=True` an indexed container is read
  as an `IterableDataset` (`to_iterable_dataset`). Anything else: None (a manifest file, read by
  `examples.load_manifest`).
- `undecoded_media(dataset)`: `Audio()` and `Video()` columns cast to `decode=False`, so rows hold
  `{bytes, path}` and the package decodes them itself (soundfile / PyAV); `datasets` would need torchcodec.
  `Image()` columns are cast too, so a picture is decoded once, by the processor, when it is used.
- `media_value(value)`: a media cell as the processor takes it: `{bytes, path}` -> the bytes (or the path when
  the bytes are absent); `{array, sampling_rate}` decoded audio and everything else unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import datasets

MEDIA_FEATURES = tuple(getattr(datasets, name) for name in ("Image", "Audio", "Video") if hasattr(datasets, name))


STREAMED = (datasets.IterableDataset, datasets.IterableDatasetDict)


def open_container(source, split: str = "train", streaming: bool = False):
    """(rows, a name for errors) for a container source, or None when `source` is a manifest file (or list of them).

    The rows are a `datasets.Dataset`, or an `IterableDataset` for a streamed source or with `streaming=True`."""
    if isinstance(source, datasets.IterableDataset):
        return source, "Manifest (in-memory IterableDataset)"
    if isinstance(source, datasets.IterableDatasetDict):
        return _split(source, split, "in-memory IterableDatasetDict"), f"Manifest (in-memory IterableDatasetDict, split {split!r})"
    opened = _open_indexed(source, split)
    if opened is None or not streaming:
        return opened
    return opened[0].to_iterable_dataset(), opened[1]


def _open_indexed(source, split: str) -> tuple[datasets.Dataset, str] | None:
    if isinstance(source, datasets.Dataset):
        return source, "Manifest (in-memory dataset)"
    if isinstance(source, datasets.DatasetDict):
        return _split(source, split, "in-memory DatasetDict"), f"Manifest (in-memory DatasetDict, split {split!r})"
    if isinstance(source, (list, tuple)) or not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError as err:
            raise ValueError(f"Manifest folder {path!r} is not a save_to_disk folder (Dataset or DatasetDict): {err}") from None
        if isinstance(loaded, datasets.DatasetDict):
            return _split(loaded, split, repr(path)), f"Manifest {path!r} (split {split!r})"
        return loaded, f"Manifest {path!r}"
    if path.lower().endswith(".arrow"):
        if not os.path.isfile(path):
            raise ValueError(f"Manifest {path!r} does not exist (or is not a regular file).")
        try:
            return datasets.Dataset.from_file(path), f"Manifest {path!r}"
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file that is not Arrow
            raise ValueError(f"Manifest {path!r} cannot be read as an Arrow file: {err}") from None
    return None


def _split(dataset_dict, split: str, name: str):
    if split not in dataset_dict:
        raise ValueError(f"{name} has no split {split!r}; its splits: {sorted(dataset_dict)} (name one with `split:`).")
    return dataset_dict[split]


def undecoded_media(dataset):
    """Media feature columns cast to `decode=False` (rows then hold {bytes, path}); other columns unchanged.
    A streamed data set whose features are not known until it is read (JSON files) is returned as it is."""
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, MEDIA_FEATURES) and getattr(feature, "decode", False):
            dataset = dataset.cast_column(name, type(feature)(decode=False))
    return dataset


def media_value(value):
    """A `{bytes, path}` cell as bytes (or its path); decoded `{array, sampling_rate}` audio and others unchanged."""
    if isinstance(value, Mapping) and "bytes" in value and "array" not in value:
        return value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (list, tuple)):
        return [media_value(v) for v in value]
    return value


__all__ = ["STREAMED", "media_value", "open_container", "undecoded_media"]
