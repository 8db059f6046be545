"""Speech synthesised by espeak-ng, resampled to 16 kHz mono 16-bit WAV.

espeak-ng writes 22.05 kHz; PyAV's libswresample (a windowed-sinc resampler, in-process, no extra
binary) brings it to 16 kHz. espeak-ng's output is deterministic for a voice, speed and text.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import av
import numpy as np
import soundfile

SAMPLE_RATE = 16_000
ESPEAK_INSTALL_HINT = (
    "espeak-ng was not found on PATH; the demo's speech clips are synthesised with it. Install it with "
    "`sudo apt-get install espeak-ng` (scripts/setup.sh does this), or set the speech sizes to 0."
)


def find_espeak() -> str:
    """Path of the espeak-ng binary, or a `FileNotFoundError` that says how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError(ESPEAK_INSTALL_HINT)
    return path


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono int16 `samples` with libswresample (anti-aliased); returns int16."""
    if from_rate == to_rate:
        return samples.astype(np.int16)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=to_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.int16)[None, :], format="s16", layout="mono")
    frame.sample_rate = from_rate
    out = [f.to_ndarray() for f in resampler.resample(frame)] + [f.to_ndarray() for f in resampler.resample(None)]
    return np.concatenate(out, axis=1)[0]  # (1, samples) -> (samples,)


def synthesize(text: str, voice: str, speed: int, path: Path, espeak: str) -> float:
    """Speak `text` into a 16 kHz mono WAV at `path`; returns the clip's duration in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        result = subprocess.run(
            [espeak, "-v", voice, "-s", str(speed), "-w", str(raw), text], capture_output=True, text=True
        )
        if result.returncode != 0 or not raw.is_file():
            raise RuntimeError(
                f"espeak-ng failed for voice {voice!r}, speed {speed}, text {text!r} "
                f"(exit {result.returncode}): {result.stderr.strip()}"
            )
        samples, rate = soundfile.read(raw, dtype="int16", always_2d=True)
    mono = samples.mean(axis=1).astype(np.int16) if samples.shape[1] > 1 else samples[:, 0]
    audio = resample(mono, rate)
    soundfile.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return round(len(audio) / SAMPLE_RATE, 4)
