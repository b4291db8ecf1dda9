"""Opening a file only when it is a regular file: a FIFO named like an image or an annotation
must be refused, never opened (opening one blocks until a writer appears, i.e. forever)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotRegularFileError(OSError):
    """A path names a FIFO, device or socket, where a regular file was expected."""


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _check_regular(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError("a folder, not a file")
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"{_kind(mode)}, not a regular file")


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file (symlinks followed).

    A FIFO, device or socket raises NotRegularFileError and a folder IsADirectoryError, before
    anything is opened: opening a FIFO blocks until some writer appears, i.e. forever. The file
    is opened non-blocking and checked again, so one swapped in meanwhile cannot block either.
    A missing file raises FileNotFoundError; a path holding a NUL raises ValueError.
    """
    _check_regular(os.stat(path).st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        _check_regular(os.fstat(fd).st_mode)
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # no effect on a regular file's reads; restored all the same
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
