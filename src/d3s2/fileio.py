"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` (parent folders created) and rename it onto ``path`` when the block
    ends without an exception; on an exception the temporary file is removed and the target is left untouched.

    The temporary file lives in the target's folder so that ``os.replace`` is a same-filesystem, atomic rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> None:
    """Raise :class:`~d3s2.errors.D3S2Error` unless files can be created in folder ``path``, without creating it.

    ``path`` must be a folder, or not exist yet below a folder (its nearest existing ancestor) that is one; a hidden
    probe file is created and removed there, which catches read-only mounts and ACLs that permission bits miss.
    ``what`` names the setting in the message (e.g. ``"-o"``)."""
    from d3s2.errors import D3S2Error

    path = os.path.abspath(os.fspath(path))
    probe_dir = path
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        where = "is" if probe_dir == path else f"cannot be created: {probe_dir} is"
        raise D3S2Error(f"{what}: {path} {where} a file, not a folder; choose another folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".d3s2_write_probe.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise D3S2Error(f"{what}: cannot write in {probe_dir} ({exc.strerror or exc}); choose a writable folder") \
            from exc


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_open` (``.<target>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_temp_files(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Delete the temporary files an interrupted :func:`atomic_open` left in ``folder`` (a SIGKILL skips its clean-up).

    Call it only where no other process is writing (e.g. an item folder a resumed job owns). Returns the removed
    paths."""
    removed = []
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return removed
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            if is_temp_name(name):
                path = os.path.join(dirpath, name)
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        if not recursive:
            break
    return removed


def remove_empty_dirs(folder: str | os.PathLike) -> bool:
    """Remove ``folder`` and its sub-folders bottom-up where they hold no file; True when ``folder`` is gone."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return not os.path.exists(folder)
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError:  # not empty
            pass
    return not os.path.exists(folder)
