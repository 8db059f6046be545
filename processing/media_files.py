"""Opening media files safely: regular files only, opened without blocking.

A path a user (or a manifest) hands us may name a FIFO, a device or a directory. Opening a FIFO for
reading blocks until a writer appears, and a device such as `/dev/zero` never ends, so a decoder given
either hangs or fills memory. `open_media_file` opens the path with `O_NONBLOCK` (a FIFO then opens at
once) and checks what was opened with `fstat` on the open descriptor, so the file checked is the file
read (no window between a check and the open in which the path could be swapped).
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_media_file(path: str | os.PathLike, name: str) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (symlinks followed); else raise `ValueError`.

    `name` is how errors refer to the file (e.g. "file 'a.png'"). Never blocks: a FIFO is refused, not read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise ValueError(f"{name} does not exist") from None
    except PermissionError:
        raise ValueError(f"{name} cannot be read: permission denied") from None
    except IsADirectoryError:
        raise ValueError(f"{name} is a directory, not a media file") from None
    except OSError as err:
        raise ValueError(f"{name} cannot be opened: {err.strerror or err}") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise ValueError(f"{name} is {_kind(mode)}, not a regular file; only regular media files are read")
    if flags & getattr(os, "O_NONBLOCK", 0):  # regular files ignore it, but the decoders need not know
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


__all__ = ["open_media_file"]
