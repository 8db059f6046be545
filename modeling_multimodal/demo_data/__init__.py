"""Offline demo data: shapes (images), moving shapes (videos) and espeak-ng speech, made on this machine.

Small enough to generate in seconds and for a tiny model to learn on CPU in minutes, with a test split
of held-out attribute combinations and voices (see `grammar.py`). `make_av_demo_data` writes the audio-visual
task's clips (`av_videos.py`: the colour is spoken in the mp4's sound track, the shape and motion are seen).

    >>> from modeling_multimodal.demo_data import make_demo_data, read_manifest
    >>> meta = make_demo_data("demo_output/data", seed=0)  # returns what it writes to meta.json
    >>> row = read_manifest("demo_output/data", "image", "train")[0]
    >>> row["image"], row["caption"]
    ('images/train/000000.png', 'a large green triangle in the bottom centre')
"""

from .av_videos import make_av_demo_data
from .build import DEFAULT_SIZES, MEDIA_KEY, TASKS, make_demo_data, manifest_path, read_manifest
from .grammar import HELD_OUT_PAIRS, SPLITS, TEST_VOICES, TRAIN_VOICES
from .speech import SAMPLE_RATE

__all__ = [
    "DEFAULT_SIZES",
    "HELD_OUT_PAIRS",
    "MEDIA_KEY",
    "SAMPLE_RATE",
    "SPLITS",
    "TASKS",
    "TEST_VOICES",
    "TRAIN_VOICES",
    "make_av_demo_data",
    "make_demo_data",
    "manifest_path",
    "read_manifest",
]
