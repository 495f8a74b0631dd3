"""Declarative pipelines: a TOML file picks each stage's settings.

A pipeline file has one table per stage (`[registration]`, `[preprocessing]`, ...) whose keys are the
field names of that stage's settings dataclass. Unknown keys and wrong types are errors that name the
key and its line, because a silently ignored typo would change a clinical result.

The shipped pipelines live in `pipelines/*.toml` at the project's top, linked into the package as
`longitudinal/pipelines` (a symlink the wheel build follows) and read with `importlib.resources`, so an
installed wheel finds them. File paths inside a pipeline (`label_map`,
`normative_model`, encoder `weights`, any `Path` setting) are relative to the TOML file, not to the working
directory: a pipeline folder can be moved or shared with the files it names.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError
from .settings import SettingError

if TYPE_CHECKING:
    from .encoding import EncoderSettings
    from .io import InputSettings
    from .masks import MaskSettings
    from .preprocessing import PreprocessingSettings
    from .registration import RegistrationSettings
    from .regions import RegionSettings
    from .scoring import ScoringSettings
    from .timeline import TimelineSettings

# String settings that name a file (typed `str` in their dataclass); `Path` settings are recognised by type.
FILE_KEYS = frozenset({"weights"})


STAGES = ("input", "timeline", "masks", "registration", "preprocessing", "encoding", "regions", "scoring")


def _stage_classes() -> dict[str, type]:
    """Each stage's settings dataclass, by the name of its TOML table. Imported here so that loading a pipeline
    does not import torch unless a stage needs it."""
    from .encoding import EncoderSettings
    from .io import InputSettings
    from .masks import MaskSettings
    from .preprocessing import PreprocessingSettings
    from .registration import RegistrationSettings
    from .regions import RegionSettings
    from .scoring import ScoringSettings
    from .timeline import TimelineSettings

    classes = {"input": InputSettings, "timeline": TimelineSettings, "masks": MaskSettings,
               "registration": RegistrationSettings, "preprocessing": PreprocessingSettings,
               "encoding": EncoderSettings, "regions": RegionSettings, "scoring": ScoringSettings}
    return {stage: classes[stage] for stage in STAGES}


def _defaults(stage: str):
    return field(default_factory=lambda: _stage_classes()[stage]())


@dataclass(frozen=True)
class Pipeline:
    """A named set of settings, one dataclass per stage (a table the file leaves out gets its defaults)."""

    name: str
    version: str
    description: str = ""
    modality: str = ""
    source: str = ""
    input: InputSettings = _defaults("input")
    timeline: TimelineSettings = _defaults("timeline")
    masks: MaskSettings = _defaults("masks")
    registration: RegistrationSettings = _defaults("registration")
    preprocessing: PreprocessingSettings = _defaults("preprocessing")
    encoding: EncoderSettings = _defaults("encoding")
    regions: RegionSettings = _defaults("regions")
    scoring: ScoringSettings = _defaults("scoring")

    @property
    def stages(self) -> dict[str, object]:
        """Every stage's settings by table name, in flow order (for printing, hashing and result.json)."""
        return {stage: getattr(self, stage) for stage in STAGES}


def available() -> dict[str, Traversable]:
    """Pipelines shipped with the package, by name (package resources: they work from a wheel too)."""
    folder = resources.files(__package__).joinpath("pipelines")
    return {r.name.removesuffix(".toml"): r
            for r in sorted(folder.iterdir(), key=lambda r: r.name) if r.name.endswith(".toml")}


def load(name_or_path: str | os.PathLike | Traversable) -> Pipeline:
    """A shipped pipeline by name (`brain-mri`), a shipped resource from `available()`, or any file by path."""
    if isinstance(name_or_path, str) and not Path(name_or_path).suffix:
        shipped = available()
        if name_or_path not in shipped:
            raise InputError(None, f"unknown pipeline {name_or_path!r}; shipped pipelines: {', '.join(shipped)}")
        name_or_path = shipped[name_or_path]
    if isinstance(name_or_path, (str, os.PathLike)):
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(path, "pipeline file not found")
        text = path.read_text(encoding="utf-8")
    else:  # a package resource
        text = name_or_path.read_text(encoding="utf-8")
        path = Path(str(name_or_path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(path, f"not valid TOML: {exc}") from None
    return _parse(path, text, data)


def _parse(path: Path, text: str, data: dict) -> Pipeline:
    lines = text.splitlines()
    header = {k: data.pop(k, None) for k in ("name", "version", "description", "modality")}
    for key in ("name", "version"):
        if not isinstance(header[key], str):
            raise InputError(path, f"line {_line_of(lines, None, key)}: top-level key {key!r} must be a string")
    classes = _stage_classes()
    stages = {}
    for stage, cls in classes.items():
        table = data.pop(stage, {})
        if not isinstance(table, dict):
            raise InputError(path, f"line {_line_of(lines, None, stage)}: {stage!r} must be a table [{stage}]")
        stages[stage] = _build(path, lines, stage, cls, table)
    for extra in data:
        known = ", ".join(["name", "version", "description", "modality", *classes])
        raise InputError(path, f"line {_line_of(lines, None, extra)}: unknown key {extra!r} (known: {known})")
    return Pipeline(name=header["name"], version=header["version"], description=header["description"] or "",
                    modality=header["modality"] or "", source=str(path), **stages)


def _build(path: Path, lines: list[str], stage: str, cls: type, table: dict) -> object:
    """A stage's settings from its TOML table; a bad value is one line naming the file, the line and the key.
    The rules live in the settings class (`settings.check` and its `require`s), not here."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise InputError(path, f"line {_line_of(lines, stage, key)}: [{stage}] {key}: unknown key "
                                   f"(known: {', '.join(fields)})")
    try:
        built = cls(**table)
        files = {f.name: _relative_to(path, getattr(built, f.name)) for f in dataclasses.fields(cls)
                 if f.name in table and (isinstance(getattr(built, f.name), Path) or f.name in FILE_KEYS)}
        return dataclasses.replace(built, **files) if files else built
    except SettingError as exc:
        raise InputError(path, f"line {_line_of(lines, stage, exc.key)}: [{stage}] {exc.key}: {exc.message}") from None


def _relative_to(pipeline_file: Path, value: str | Path) -> str | Path:
    """A file named in a pipeline, relative to the pipeline file's folder (absolute paths and `~` kept)."""
    named = Path(value).expanduser()
    resolved = named if named.is_absolute() else pipeline_file.resolve().parent / named
    return resolved if isinstance(value, Path) else str(resolved)


def _line_of(lines: list[str], table: str | None, key: str) -> int | str:
    """Line number of `key` inside `[table]` (or at top level), for error messages."""
    current = None
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[]").strip()
            if table is None and current == key:
                return number
            continue
        if current == table and pattern.match(line):
            return number
    return "?"


def for_image(image) -> Pipeline:
    """The shipped pipeline that fits an image when the user named none: 2D pictures, CT, else brain MRI."""
    if image.dim == 2:
        return load("generic-2d")
    if (image.meta.modality or "").upper() == "CT":
        return load("chest-ct")
    return load("brain-mri")
