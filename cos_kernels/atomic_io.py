"""Atomic writes: a file or a directory is written under a temporary name beside its final place,
then renamed into place, so a crash leaves either the old version or the new one, never half of one.

Temporary names start with "." and end in TMP_SUFFIX, so that a later run can recognise and remove
what a killed one left behind (remove_stale). Written files and directories get the permissions the
umask gives (tempfile alone would make them private to the owner).

A full disk, one rule for every writer (checkpoints, the LLM warm-up, save_pretrained, the port, the
vision-tower cache): a failed write is re-worded as
    OSError(ENOSPC, "no space left on the device writing PATH (N bytes free): <the writer's error>")
when the failure is a full disk, that is when either
  - the error, or one it was raised from, is an OSError ENOSPC / EDQUOT or its text holds the
    system's words for them ("No space left on device", "Disk quota exceeded"): libraries wrap the
    OSError in their own type (safetensors' SafetensorError is no OSError), or
  - under 1 MiB is free on the filesystem at the moment of the failure, measured while the partial
    temporary still holds what was written (a writer that streams its output stops on a full disk
    with nearly nothing free; removing the partial output frees that space again, so measuring
    afterwards would miss it; and torch.save's own messages, "unexpected pos N vs M" or
    "basic_ios::clear: iostream error", do not say why it failed).
A KeyboardInterrupt or SystemExit during a write is never re-worded.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_file", "atomic_dir", "atomic_text", "remove_stale", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, an exhausted quota
NEARLY_FULL_BYTES = 1 << 20  # a failed write with less than this free is taken for a full disk


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _says_full(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it was raised from reports a full disk or an exhausted quota."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        if any(os.strerror(code).lower() in str(err).lower() for code in FULL_ERRNOS):
            return True
        err = err.__cause__ or err.__context__
    return False


def _write_error(err: BaseException, path: Path) -> BaseException:
    """``err`` re-worded as OSError(ENOSPC) naming ``path`` when the write failed on a full disk (the
    rule in the module docstring); call it before removing the partial temporary."""
    if not isinstance(err, Exception):
        return err
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if _says_full(err) or (free is not None and free < NEARLY_FULL_BYTES):
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
        new = _write_error(err, path)  # while the partial file still takes its space
        Path(tmp).unlink(missing_ok=True)
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
        new = _write_error(err, final)  # while the partial directory still takes its space
        shutil.rmtree(tmp, ignore_errors=True)
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
