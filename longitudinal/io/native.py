"""Messages the image libraries print go to the `longitudinal` log, not the terminal.

pydicom and nibabel speak through Python warnings; ITK, GDCM, VNL, OpenJPEG, libjpeg and niftilib
write straight to the process's stderr (file descriptor 2), where Python cannot intercept them. Around
each library call `library_messages` catches both and logs them at DEBUG (`--debug` shows them); the
caller also gets the lines, because some of them are the only sign of a failure (niftilib's
"** ERROR: NWAD: wrote only 0 of N bytes" on a full disk returns normally).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator

log = logging.getLogger(__name__)

# File descriptor 2 and the warnings filters belong to the whole process: two threads capturing at once would
# restore each other's redirection (stderr left pointing at a closed capture). One capture at a time.
_CAPTURE = threading.RLock()


class StderrHandler(logging.StreamHandler):
    """A log handler whose records wait while another thread captures stderr (they would be swallowed into that
    capture); the capturing thread's own records go through, as before."""

    def handle(self, record: logging.LogRecord) -> bool:
        with _CAPTURE:  # taken before the handler's own lock: always in that order, so no deadlock
            return super().handle(record)


@contextlib.contextmanager
def library_messages(what: str) -> Iterator[list[str]]:
    """Capture Python warnings and native stderr output during the block; log them, and fill the yielded list.

    Keep the block to library calls: our own log records written to stderr inside it would be captured too.
    """
    lines: list[str] = []
    caught: list[warnings.WarningMessage] = []
    native: list[str] = []
    try:
        with _CAPTURE, warnings.catch_warnings(record=True) as caught, _native_stderr() as native:
            warnings.simplefilter("always")
            yield lines
    finally:
        lines.extend(f"{w.category.__name__}: {w.message}" for w in caught)
        lines.extend(line for line in native if line.strip())
        for line in lines:
            log.debug("%s: %s", what, line.strip())


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 to a temp file for the block; yields the list its lines are put in."""
    lines: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon): nothing to capture
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        _flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            _flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read(1 << 20).decode("utf-8", "replace").splitlines())


def _flush() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()
