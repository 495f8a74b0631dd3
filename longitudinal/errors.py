"""Errors for the user (bad input, an output that cannot be written): one clear line, never a traceback."""

from __future__ import annotations

import re
from os import PathLike

# Control characters (C0, DEL, C1: ANSI escape sequences start with ESC or CSI) and Unicode bidirectional
# overrides: from a file name or a header they could recolour, move or hide text on the user's terminal.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with control characters escaped (\\x1b, \\u202e): safe on one terminal line."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


class InputError(ValueError):
    """Input the tool cannot use; the message names the file and what is wrong with it.

    Control characters in the path or the problem (from file names or headers) are escaped.
    """

    def __init__(self, path: str | PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        message = problem if path is None else f"{self.path}: {problem}"
        super().__init__(printable(message))


class OutputError(OSError):
    """An output that could not be written (disk full, no permission, a short write) or that does not read back;
    the message names the file or folder. The CLI prints it in one line and exits with status 3."""

    def __init__(self, message: str):
        super().__init__(printable(message))

    def __str__(self) -> str:
        return self.args[0]
