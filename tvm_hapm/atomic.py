"""Atomic output: a file or a folder is written under a temporary name beside its destination and
renamed into place only once complete, so an interrupted run leaves the previous output intact."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replaced_dir", "write_bytes", "write_figure", "write_text"]

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically (renameat2, Linux >= 3.15)
_AT_FDCWD = -100


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temporary file, fsync, rename).

    Parameters
    ----------
    path : str or Path
        Destination; its folder must exist.
    data : bytes
        The whole content.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    # the permissions a plain open() would give (mkstemp makes the file private), or the old file's
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> Path:
    """:func:`write_bytes` of ``text`` encoded as UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def write_figure(path, fig, dpi: int = 120) -> Path:
    """:func:`write_bytes` of a matplotlib figure rendered in memory, in the format ``path``'s
    suffix names (PNG without one)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi)
    return write_bytes(path, buffer.getvalue())


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    res = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return res == 0


@contextlib.contextmanager
def replaced_dir(path, marker: str | None = None) -> Iterator[Path]:
    """Build the new content of the folder ``path`` in a temporary sibling, which is yielded; it
    replaces ``path`` when the block completes.

    When the block raises (Ctrl-C included) the sibling is removed and ``path`` is left as it
    was.  The replacement is one atomic exchange of the two folders where the system has
    ``renameat2`` (Linux), else two renames; the old content is deleted only once the new one is
    in place, so files of the old output that the new one does not have do not survive.

    Parameters
    ----------
    path : str or Path
        The folder to write; its parent must exist.
    marker : str, optional
        A file every output of this kind has (e.g. ``"report.json"``): a non-empty folder at
        ``path`` without it is not replaced (``FileExistsError``), so a folder the user named by
        mistake is never deleted.

    Raises
    ------
    NotADirectoryError
        ``path`` is a file.
    FileExistsError
        ``path`` is a non-empty folder without ``marker``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder")
    if marker is not None and path.is_dir() and any(path.iterdir()):
        if not (path / marker).exists():
            raise FileExistsError(
                f"{path} is a folder with other content (no {marker}); it is not replaced"
            )
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, path.stat().st_mode & 0o7777 if path.is_dir() else 0o777 & ~_umask())
    try:
        yield tmp
        if not path.exists():
            os.rename(tmp, path)
            return
        if _exchange(tmp, path):  # tmp now holds the old output
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.rmdir(old)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
