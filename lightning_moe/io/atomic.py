"""Atomic writes: a file or a whole directory appears complete at its path, or not at all.

A kill (``kill -9``, power loss, out of memory) at any moment of a write leaves either the previous
file/directory or the new one at the destination, never a truncated mix, and nothing in ``$TMPDIR``:
everything is staged *beside* the destination (same filesystem, so the final step is a rename, not
a copy).

Files (:func:`atomic_file`, :func:`atomic_save`)::

    with atomic_file("runs/x/last.ckpt") as f:    # f writes runs/x/.last.ckpt.<random>.tmp
        torch.save(checkpoint, f)                  # on exit: flush, fsync, os.replace, fsync the folder

Directories (:func:`atomic_directory` in one process, :class:`AtomicDirectory` across ranks)::

    with atomic_directory("runs/x/step=100.ckpt") as staging:   # runs/x/.step=100.ckpt.partial
        ...write any files under staging...
    # on exit: every file fsynced, then staging swapped into place, the old directory removed

For a directory written by several processes (a distributed checkpoint), the staging name is
deterministic, so every rank knows it without communicating::

    target = AtomicDirectory(path)
    if rank == 0:
        target.begin()          # recover an interrupted swap, clear a stale staging dir, create it
    barrier()
    write_my_files(target.staging)   # e.g. torch.distributed.checkpoint.save(..., checkpoint_id=target.staging)
    barrier()
    if rank == 0:
        target.commit()         # fsync, swap into place, drop the previous version

Swapping a directory into place where an older one exists takes two renames on most systems
(old -> ``.<name>.old``, staging -> name); on Linux both happen at once (``renameat2`` with
``RENAME_EXCHANGE``). A kill between the two renames leaves the previous version at
``.<name>.old``; :func:`recover_directory` (called by :meth:`AtomicDirectory.begin` and by the
checkpoint loader) puts it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "AtomicDirectory",
    "atomic_directory",
    "atomic_file",
    "atomic_path",
    "atomic_save",
    "fsync_directory",
    "recover_directory",
]

_PARTIAL_SUFFIX = ".partial"
_OLD_SUFFIX = ".old"
_RENAME_EXCHANGE = 2  # linux/fs.h


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new, renamed or removed names) to disk.

    A no-op where directories cannot be opened (Windows).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network mounts) refuse fsync on a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` atomically.

    The temporary file is ``.<name>.<random>.tmp`` in ``path``'s folder (created if missing). On a
    clean exit it is flushed and fsynced, renamed over ``path`` with :func:`os.replace` and the folder
    is fsynced; on an exception it is deleted and ``path`` is untouched.

    Args:
        path: the destination file.
        mode: ``"wb"`` (default) or ``"w"`` (text, UTF-8).

    Yields:
        The open temporary file.

    Raises:
        ValueError: if ``mode`` is not a write mode.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode={mode!r} is not supported; use 'wb' (bytes) or 'w' (text)")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_directory(dest.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (``safetensors.save_file``).

    On a clean exit the file the writer created there is fsynced and renamed over ``path``; on an
    exception it is deleted and ``path`` is untouched.

    Example::

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))

    Args:
        path: the destination file.

    Yields:
        The temporary path (``.<name>.<random>.tmp`` in ``path``'s folder, not yet created).

    Raises:
        FileNotFoundError: if the writer created no file at the temporary path.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_directory(dest.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}{suffix}")


def recover_directory(path: str | os.PathLike) -> bool:
    """Undo a directory swap interrupted between its two renames.

    If ``path`` is missing and the previous version waits at ``.<name>.old``, move it back.

    Args:
        path: the destination directory of :class:`AtomicDirectory`.

    Returns:
        Whether a previous version was restored.
    """
    dest = Path(path)
    old = _sibling(dest, _OLD_SUFFIX)
    if not dest.exists() and old.is_dir():
        os.rename(old, dest)
        fsync_directory(dest.parent)
        return True
    return False


class AtomicDirectory:
    """A directory that is written in a staging folder beside it and swapped into place when complete.

    ``staging`` (``.<name>.partial`` in the same folder) is a pure function of ``path``, so several
    processes can agree on it without communicating; only one process should call :meth:`begin`
    and :meth:`commit` (see the module docstring for the multi-rank pattern).

    Args:
        path: the destination directory.

    Attributes:
        path: the destination directory.
        staging: where the new version is written before :meth:`commit`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.staging = _sibling(self.path, _PARTIAL_SUFFIX)

    def begin(self) -> Path:
        """Prepare an empty staging directory (after recovering an interrupted swap).

        Returns:
            The staging directory.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(self.path)
        shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(_sibling(self.path, _OLD_SUFFIX), ignore_errors=True)
        self.staging.mkdir()
        return self.staging

    def commit(self, fsync_files: bool = True) -> None:
        """Swap the staging directory into place and remove the previous version.

        Args:
            fsync_files: fsync every file under the staging directory first (set False only if
                every writer already fsynced its files).

        Raises:
            FileNotFoundError: if :meth:`begin` was not called.
            NotADirectoryError: if ``path`` exists and is a file (a single-file checkpoint of the
                same name); it is left untouched.
        """
        if not self.staging.is_dir():
            raise FileNotFoundError(f"nothing to commit: staging directory {self.staging} does not exist")
        if fsync_files:
            for root, dirs, files in os.walk(self.staging):
                for name in files:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                for name in dirs:
                    fsync_directory(os.path.join(root, name))
            fsync_directory(self.staging)
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_dir():
                raise NotADirectoryError(
                    f"{self.path} is a file, not a directory; remove it or save the directory checkpoint elsewhere"
                )
            old = _sibling(self.path, _OLD_SUFFIX)
            shutil.rmtree(old, ignore_errors=True)
            if _exchange(self.staging, self.path):
                os.rename(self.staging, old)  # the swapped-out previous version
            else:
                os.rename(self.path, old)
                os.rename(self.staging, self.path)
            fsync_directory(self.path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.staging, self.path)
        fsync_directory(self.path.parent)

    def abort(self) -> None:
        """Remove the staging directory; ``path`` is untouched."""
        shutil.rmtree(self.staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Write a directory atomically in one process.

    Example::

        with atomic_directory("out/model") as tmp:
            atomic_save(weights, tmp / "weights.pt")   # or any writer

    Args:
        path: the destination directory; an existing one is replaced only once the new one is complete.

    Yields:
        The staging directory to write into.
    """
    target = AtomicDirectory(path)
    staging = target.begin()
    try:
        yield staging
    except BaseException:
        target.abort()
        raise
    target.commit()
