"""One error type for bad input, so the CLI can print one clear line instead of a traceback."""

from __future__ import annotations

from os import PathLike


class InputError(ValueError):
    """Input the tool cannot use; the message names the file and what is wrong with it."""

    def __init__(self, path: str | PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")
