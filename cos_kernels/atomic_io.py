"""Atomic writes: a file or a directory is written under a temporary name beside its final place,
then renamed into place, so a crash leaves either the old version or the new one, never half of one.

Temporary names start with "." and end in TMP_SUFFIX, so that a later run can recognise and remove
what a killed one left behind (remove_stale). Written files and directories get the permissions the
umask gives (tempfile alone would make them private to the owner).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_file", "atomic_dir", "atomic_text", "remove_stale", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(err: BaseException, path: Path) -> BaseException:
    """``err`` re-worded when the filesystem of ``path`` is full (the libraries' own messages, such as
    torch.save's "basic_ios::clear: iostream error", do not say so)."""
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if full or (free is not None and free < 1 << 20):
        return OSError(errno.ENOSPC, f"no space left on the device writing {path} ({free} bytes free): {err}")
    return err


def atomic_file(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after: some writers (safetensors) create the file 0600
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        new = _write_error(err, path)
        if new is err:
            raise
        raise new from err


def atomic_text(path: str | os.PathLike, text: str) -> None:
    atomic_file(path, lambda tmp: Path(tmp).write_text(text))


def atomic_dir(final: str | os.PathLike, write) -> None:
    """Call ``write(tmp_dir)``, then rename tmp_dir to ``final`` (replacing an older one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent))
    try:
        write(tmp)
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for inner in tmp.rglob("*"):
            os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~mask)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", suffix=TMP_SUFFIX, dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        new = _write_error(err, final)
        if new is err:
            raise
        raise new from err


def remove_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories a killed writer left in ``directory``; returns them."""
    directory = Path(directory)
    stale = sorted(directory.glob(f".*{TMP_SUFFIX}")) if directory.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
