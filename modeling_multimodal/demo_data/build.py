"""`make_demo_data`: plan every split from the grammar, render the media, write manifests and meta.json.

Each (task, split) draws from its own random generator seeded by (seed, task, split), so the same seed
gives the same bytes, and changing one split's size leaves the other splits unchanged. A split walks a
shuffled list of every attribute combination it may use, so captions repeat only once that list is
exhausted (the default test split of 150 images has 150 distinct captions, as retrieval needs).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import numpy as np

from . import grammar
from .images import render_image
from .speech import SAMPLE_RATE, find_espeak, synthesize
from .videos import pick_codec, render_frames, write_video

TASKS = ("image", "video", "speech")
MEDIA_KEY = {"image": "image", "video": "video", "speech": "audio"}
MEDIA_DIR = {"image": "images", "video": "videos", "speech": "audio"}
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "image": {"train": 600, "validation": 100, "test": 150},
    "video": {"train": 240, "validation": 40, "test": 60},
    "speech": {"train": 320, "validation": 40, "test": 80},
}
FORMAT_VERSION = 1


def manifest_path(out_dir: str | PathLike, task: str, split: str) -> Path:
    """`out_dir/<task>_<split>.jsonl`; media paths inside it are relative to `out_dir`."""
    if task not in TASKS or split not in grammar.SPLITS:
        raise ValueError(f"Unknown task/split {task!r}/{split!r}; tasks {TASKS}, splits {grammar.SPLITS}.")
    return Path(out_dir) / f"{task}_{split}.jsonl"


def read_manifest(out_dir: str | PathLike, task: str, split: str) -> list[dict]:
    """The rows of one manifest, in order."""
    path = manifest_path(out_dir, task, split)
    if not path.is_file():
        raise FileNotFoundError(f"No manifest {path}; run `modeling-multimodal make-demo-data --out {out_dir}` first.")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def resolve_sizes(sizes: Mapping[str, Mapping[str, int]] | None) -> dict[str, dict[str, int]]:
    """`DEFAULT_SIZES` updated by `sizes` (any subset of tasks and splits); checks names and values."""
    resolved = {task: dict(splits) for task, splits in DEFAULT_SIZES.items()}
    for task, splits in (sizes or {}).items():
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r} in sizes; expected some of {TASKS}.")
        for split, count in splits.items():
            if split not in grammar.SPLITS:
                raise ValueError(f"Unknown split {split!r} in sizes[{task!r}]; expected some of {grammar.SPLITS}.")
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"sizes[{task!r}][{split!r}] must be a non-negative int, got {count!r}.")
            resolved[task][split] = count
    return resolved


def _rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, TASKS.index(task), grammar.SPLITS.index(split)])


def _plan(combinations: list[tuple], count: int, rng: np.random.Generator) -> list[tuple]:
    """`count` combinations: passes over `combinations`, each in a fresh random order."""
    plan = []
    while len(plan) < count:
        plan.extend(combinations[i] for i in rng.permutation(len(combinations)))
    return plan[:count]


def _image_rows(out_dir: Path, split: str, count: int, rng, image_size: int, combinations: list) -> list[dict]:
    rows = []
    for index, (colour, shape, size, row, column) in enumerate(_plan(combinations, count, rng)):
        image, attributes = render_image(colour, shape, size, row, column, image_size, rng)
        relative = f"{MEDIA_DIR['image']}/{split}/{index:06d}.png"
        image.save(out_dir / relative)
        caption = grammar.image_caption(size, colour, shape, attributes["position"])
        rows.append(
            {"id": f"image-{split}-{index:06d}", "image": relative, "caption": caption, "attributes": attributes}
        )
    return rows


def _video_rows(out_dir: Path, split: str, count: int, rng, combinations: list, video_size: int, num_frames: int, fps: int, codec: str):
    rows = []
    for index, (colour, shape, size, direction) in enumerate(_plan(combinations, count, rng)):
        frames, attributes = render_frames(colour, shape, size, direction, video_size, num_frames, rng)
        relative = f"{MEDIA_DIR['video']}/{split}/{index:06d}.mp4"
        write_video(out_dir / relative, frames, fps, codec)
        attributes.update(num_frames=num_frames, fps=fps)
        caption = grammar.video_caption(size, colour, shape, direction)
        rows.append(
            {"id": f"video-{split}-{index:06d}", "video": relative, "caption": caption, "attributes": attributes}
        )
    return rows


def _speech_rows(out_dir: Path, split: str, count: int, rng, combinations: list, espeak: str) -> list[dict]:
    sentences = [grammar.sentence(c) for c in combinations]
    plan = list(itertools.product(sentences, grammar.voices_for_split(split), grammar.SPEEDS))
    rows = []
    for index, (sentence, voice, speed) in enumerate(_plan(plan, count, rng)):
        relative = f"{MEDIA_DIR['speech']}/{split}/{index:06d}.wav"
        duration = synthesize(sentence, voice, speed, out_dir / relative, espeak)
        rows.append(
            {"id": f"speech-{split}-{index:06d}", "audio": relative, "transcript": sentence,
             "voice": voice, "speed": speed, "duration": duration}
        )
    return rows


def _config(seed, sizes, image_size, video_size, num_frames, fps, holdout) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes, "image_size": image_size,
            "video_size": video_size, "num_frames": num_frames, "fps": fps, "sample_rate": SAMPLE_RATE,
            "holdout": holdout}


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Clear a previous demo data set in `out_dir`; refuse to write into a folder that holds other files."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "meta.json").is_file() and not overwrite:
            raise FileExistsError(
                f"{out_dir} is not empty and holds no demo data (no meta.json); choose an empty or new folder, "
                "or pass overwrite=True to write into it anyway."
            )
        for name in MEDIA_DIR.values():
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for task, split in itertools.product(TASKS, grammar.SPLITS):
            manifest_path(out_dir, task, split).unlink(missing_ok=True)
        for name in ("meta.json", "README.md"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def make_demo_data(
    out_dir: str | PathLike,
    seed: int = 0,
    sizes: Mapping[str, Mapping[str, int]] | None = None,
    *,
    image_size: int = 64,
    video_size: int = 64,
    num_frames: int = 12,
    fps: int = 6,
    holdout: str = "combinations",
    overwrite: bool = False,
) -> dict:
    """Generate the offline demo data set in `out_dir` and return its metadata (also in meta.json).

    Writes `images/`, `videos/`, `audio/` with train/validation/test subfolders, one JSONL manifest per
    task and split (`<task>_<split>.jsonl`, see `manifest_path`), `meta.json` and `README.md`.
    `holdout` picks what only the test split may use (`grammar.HOLDOUTS`: unseen attribute combinations,
    or the stricter unseen colour+shape pairs; an unseen voice for speech either way).
    `sizes` overrides any part of `DEFAULT_SIZES`, e.g. `{"speech": {"train": 0}}`; speech needs
    espeak-ng only when some speech size is non-zero. If `out_dir` already holds a data set made with
    the same arguments it is reused as is, unless `overwrite`.
    """
    out_dir = Path(out_dir)
    sizes = resolve_sizes(sizes)
    if video_size % 2 or image_size < 16 or video_size < 16 or num_frames < 2 or fps < 1:
        raise ValueError(
            f"Need image_size >= 16, an even video_size >= 16, num_frames >= 2 and fps >= 1; got "
            f"image_size={image_size}, video_size={video_size}, num_frames={num_frames}, fps={fps}."
        )
    if holdout not in grammar.HOLDOUTS:
        raise ValueError(f"Unknown holdout rule {holdout!r}; expected one of {grammar.HOLDOUTS}.")
    config = _config(seed, sizes, image_size, video_size, num_frames, fps, holdout)
    meta_file = out_dir / "meta.json"
    if meta_file.is_file() and not overwrite:
        existing = json.loads(meta_file.read_text(encoding="utf-8"))
        manifests_present = all(manifest_path(out_dir, t, s).is_file() for t in TASKS for s in grammar.SPLITS)
        if existing.get("config") == config and manifests_present:
            return existing
    espeak = find_espeak() if any(sizes["speech"].values()) else None  # fail before writing anything
    codec = pick_codec() if any(sizes["video"].values()) else None
    _prepare_out_dir(out_dir, overwrite)

    for task, split in itertools.product(TASKS, grammar.SPLITS):
        (out_dir / MEDIA_DIR[task] / split).mkdir(parents=True, exist_ok=True)
        rng, count = _rng(seed, task, split), sizes[task][split]
        combinations = grammar.combinations_for_split(task, split, holdout, seed)
        if task == "image":
            rows = _image_rows(out_dir, split, count, rng, image_size, combinations)
        elif task == "video":
            rows = _video_rows(out_dir, split, count, rng, combinations, video_size, num_frames, fps, codec) if count else []
        else:
            rows = _speech_rows(out_dir, split, count, rng, combinations, espeak) if count else []
        with open(manifest_path(out_dir, task, split), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)

    meta = {
        "config": config,
        "counts": sizes,
        "manifests": {t: {s: manifest_path(out_dir, t, s).name for s in grammar.SPLITS} for t in TASKS},
        "media_keys": {t: MEDIA_KEY[t] for t in TASKS},
        "video_codec": codec,
        "held_out": _held_out_meta(holdout, seed),
        "train_voices": list(grammar.TRAIN_VOICES),
        "speeds_wpm": list(grammar.SPEEDS),
        "vocabulary": grammar.vocabulary(),
    }
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(_readme(meta), encoding="utf-8")
    return meta


def _held_out_meta(holdout: str, seed: int) -> dict:
    """What only the test split uses, for meta.json and the data README."""
    meta = {"rule": holdout, "voices": list(grammar.TEST_VOICES)}
    if holdout == "pairs":
        meta["colour_shape_pairs"] = [list(pair) for pair in grammar.HELD_OUT_PAIRS]
        meta["description"] = ("test uses only the held-out colour+shape pairs (and, for speech, only the held-out "
                               "voices); train and validation never use them")
    else:
        meta["combinations"] = {task: sorted(map(list, grammar.held_out_combinations(task, seed))) for task in TASKS}
        meta["description"] = (f"test uses only the held-out attribute combinations ({grammar.TEST_FRACTION:.0%} of each "
                               "task's, every pair of attribute values still in training) and, for speech, only the "
                               "held-out voices; train and validation never use them")
    return meta


def _readme(meta: dict) -> str:
    counts = "\n".join(
        f"| {task} | {meta['counts'][task]['train']} | {meta['counts'][task]['validation']} | {meta['counts'][task]['test']} |"
        for task in TASKS
    )
    held_out = meta["held_out"]
    if held_out["rule"] == "pairs":
        what = "the colour+shape pairs " + ", ".join(f"{c} {s}" for c, s in held_out["colour_shape_pairs"])
    else:
        sizes = ", ".join(f"{len(held_out['combinations'][t])} {t}" for t in TASKS)
        what = f"{sizes} attribute combinations (listed in meta.json; every pair of attribute values still occurs in training)"
    config = meta["config"]
    return f"""# modeling-multimodal demo data

Synthetic, made on this machine by `modeling_multimodal.demo_data.make_demo_data` (seed {config['seed']}).

| task | train | validation | test |
|---|---|---|---|
{counts}

- image: {config['image_size']}x{config['image_size']} PNG shapes, captions like "a small red circle in the top left".
- video: {config['video_size']}x{config['video_size']} mp4 ({meta['video_codec']}), {config['num_frames']} frames at {config['fps']} fps,
  captions like "a large blue square moving right".
- speech: espeak-ng, 16 kHz mono 16-bit WAV, transcripts like "show me the green star".

Manifests: `<task>_<split>.jsonl`, media paths relative to this folder.

Held out of train and validation, used only by test (rule "{held_out['rule']}"): {what};
the voices {', '.join(held_out['voices'])} (speech). Test scores measure generalisation to unseen
combinations, not memory.
"""
