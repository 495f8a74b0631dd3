"""Error types the CLI turns into one clear line instead of a traceback: bad input, outputs that cannot be written."""

from __future__ import annotations

from os import PathLike


class InputError(ValueError):
    """Input the tool cannot use; the message names the file and what is wrong with it."""

    def __init__(self, path: str | PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


class OutputError(Exception):
    """An output that could not be written (disk full, no permission) or does not read back; the message names
    the file or folder."""
