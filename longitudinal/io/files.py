"""Files: checked input paths, and atomic, verified writes (a reader never sees half a file).

A write goes to a temp file in the target's folder, is verified (it exists, is not empty, has the expected
size or passes the caller's check, and reaches the disk: fsync), then renamed over the target. A process
killed mid-write (SIGKILL, power loss) leaves its temp file behind: temp names start with `TEMP_PREFIX` and
carry the writer's process id, so `clean_stale_temp(folder)` can remove those whose writer is gone.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError, OutputError

TEMP_PREFIX = ".longitudinal-partial-"
_STALE_AFTER_S = 24 * 3600.0  # a temp file this old is stale whoever wrote it (process ids get reused)


def existing(path: str | os.PathLike) -> Path:
    """`path` as a Path if it exists and can be read; InputError saying which (missing or permission) if not."""
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        raise InputError(p, "no such file or folder") from None
    except PermissionError:
        raise InputError(p, "permission denied: a folder on its path cannot be entered") from None
    except OSError as exc:
        raise InputError(p, f"cannot be accessed: {exc.strerror or exc}") from None
    if p.is_dir():
        try:
            next(os.scandir(p), None)
        except PermissionError:
            raise InputError(p, "permission denied: the folder cannot be listed") from None
    else:
        try:
            with open(p, "rb") as fh:
                fh.read(1)
        except PermissionError:
            raise InputError(p, "permission denied: the file cannot be read") from None
        except OSError as exc:
            raise InputError(p, f"cannot be read: {exc.strerror or exc}") from None
    return p


def _default_mode() -> int:
    """0o666 minus the process umask: what open() would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_path(path: Path) -> Path:
    """A fresh temp name next to `path`, ending like `path` (ITK picks its writer by the suffix)."""
    head = f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
    name = path.name if len(head) + len(path.name) <= 250 else "".join(path.suffixes)[-40:]
    return path.with_name(head + name)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None, *,
                 expected_size: int | None = None, verify: Callable[[Path], None] | None = None) -> Path:
    """Write through a verified temp file in the same folder, then rename.

    `write(tmp)` writes the temp file. Before the rename the temp file must exist and be non-empty (unless
    `expected_size` is 0), hold exactly `expected_size` bytes when given, pass `verify(tmp)` when given (it
    raises to refuse), and be flushed to disk; otherwise OutputError, and the target is left as it was.
    mode: file permissions; default as a plain open() would create them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        try:
            write(str(tmp))
        except OutputError:
            raise
        except OSError as exc:  # a full disk, a quota, an I/O error: one line naming the target
            raise OutputError(f"{path}: not written: {exc.strerror or exc}") from exc
        _verify(path, tmp, expected_size, verify)
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _verify(path: Path, tmp: Path, expected_size: int | None, verify: Callable[[Path], None] | None) -> None:
    try:
        size = tmp.stat().st_size
    except OSError as exc:
        raise OutputError(f"{path}: not written: the temp file vanished ({exc.strerror or exc})") from exc
    if size == 0 and expected_size != 0:
        raise OutputError(f"{path}: not written: nothing was written (0 bytes); is the disk full?")
    if expected_size is not None and size != expected_size:
        raise OutputError(f"{path}: not written: {size} bytes written, expected {expected_size}; is the disk full?")
    if verify is not None:
        try:
            verify(tmp)
        except (InputError, ValueError, OSError) as exc:
            reason = exc.problem if isinstance(exc, InputError) else str(exc)
            raise OutputError(f"{path}: not written: the written file does not read back: {reason}") from exc
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: not written: flushing to disk failed ({exc.strerror or exc})") from exc


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda p: Path(p).write_bytes(data), mode, expected_size=len(data))


def clean_stale_temp(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove temp files that writers killed mid-write left in `folder`; returns what was removed.

    A temp file is stale when its writer's process is gone, or when it is over a day old. Call it before
    writing into a folder an earlier run may have written to (e.g. a batch resuming in OUT/).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"**/{TEMP_PREFIX}*" if recursive else f"{TEMP_PREFIX}*"
    removed = []
    now = time.time()
    for tmp in sorted(folder.glob(pattern)):
        try:
            old = now - tmp.lstat().st_mtime > _STALE_AFTER_S
        except FileNotFoundError:
            continue
        if tmp.is_file() and (old or not _running(tmp.name[len(TEMP_PREFIX):].split("-", 1)[0])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid_text: str) -> bool:
    """Whether the process that wrote a temp file may still be writing it."""
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
