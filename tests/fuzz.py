"""Fuzzing the loaders with mutated DICOM and NIfTI files.

    python tests/fuzz.py --cases 10000 --seed 1            # the long run (about 20-30 min on one core)
    python tests/fuzz.py --cases 300 --seed 7 --compare 2  # what tests/test_fuzz.py runs in CI
    python tests/fuzz.py --seed 1 --replay 4711 --keep     # one case again, its files kept for a look

Inputs (seeds): the sample studies' DICOM series (a 24-slice run of each, and single slices), their hard and
easy NIfTI volumes (as .nii.gz and as an uncompressed .nii), and the pydicom test files that load. Each case
mutates one file of one seed, by bytes (bit flips, overwritten runs, truncation, insertion, deletion, a broken
preamble or gzip stream) or by value (a DICOM element set to a malformed, extreme or well-formed other value, or
removed; a NIfTI header field set to NaN, infinity, zero, a negative, an extreme or an invalid code), and is
reproducible from (seed, index) alone.

Oracle, per case, in a worker process (a crash kills only the worker; a case over `--timeout` is a hang):
- `describe` and `load_image` raise InputError with one printable line naming the case's file or folder, or
  return an image; any other exception (a traceback), a dead worker (crash) or a timeout (hang) is a finding;
- a returned image is compared with the unmutated seed's: other geometry or voxel values without an error is
  "silent". A silent change is a finding when the mutation made the header malformed (a DICOM value pydicom's
  own validator rejects, a NIfTI header float that is not finite or an invalid code); it is classed as
  undetectable when only pixel data changed (neither format carries a checksum) or a header value changed to
  another well-formed one (the file then describes another image, consistently);
- for `--compare N` cases, `longitudinal compare` with a cheap pipeline (one rigid stage, intensity change only,
  images averaged down to 300,000 values) runs on the seed's partner and the mutated input: it must exit 0, or 2
  with an error line naming a file; never 1 (a bug), a traceback, a signal or a timeout.

The exit status is 1 when there is any finding. `--out FILE` writes one JSON line per case.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_studies"
FINDINGS = ("traceback", "crash", "hang", "unnamed", "silent-malformed", "compare-bug")

CHEAP_PIPELINE = """name = "fuzz-cheap"
version = "0"
description = "fuzzing: one quick rigid stage, intensity change only, images averaged down to 300,000 values"
[input]
max_voxels = 300000
too_large = "downsample"
[registration]
stages = ["rigid"]
iterations = 20
shrink_factors = [4, 2]
smoothing_sigmas_mm = [2.0, 1.0]
[preprocessing]
n4 = false
[scoring]
maps = ["intensity"]
"""

# DICOM elements whose values the geometry, the voxel values or the grouping depend on, and others.
DICOM_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
              "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept", "NumberOfFrames", "Rows", "Columns",
              "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
              "PhotometricInterpretation", "PlanarConfiguration", "SeriesInstanceUID", "SOPClassUID", "PatientID",
              "StudyDate", "StudyTime", "Modality", "SeriesDescription", "InstanceNumber", "WindowCenter",
              "FrameOfReferenceUID", "PatientName")
NASTY_TEXT = ("", " ", "nan", "NaN", "inf", "-inf", "1e999", "-", "+", ".", "1.2.3", "\x8920", "1,5", "0x10", "--3",
              "1\\2\\3\\4\\5\\6\\7", "\\", "\x1b[31mred\x1b[0m", "\u202eevil", "9" * 40, "-0", "0", "-1", "1e-300",
              "\x00\x00", "１２", "1 2")
NIFTI_FLOATS = ("pixdim", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "srow_x",
                "srow_y", "srow_z", "scl_slope", "scl_inter", "vox_offset", "cal_min", "cal_max", "slice_duration",
                "toffset")
NIFTI_INTS = ("dim", "datatype", "bitpix", "qform_code", "sform_code", "xyzt_units", "intent_code", "slice_code",
              "sizeof_hdr", "dim_info", "slice_start", "slice_end")


# ----------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    name: str
    kind: str  # "series" (a folder, one file mutated), "dicom" (a file), "nifti" (a file)
    path: Path
    partner: Path | None = None  # the other image of a pair, for `compare`


def make_seeds(work: Path) -> list[Seed]:
    """The unmutated inputs, prepared once under `work` (small series runs, an uncompressed NIfTI)."""
    import pydicom

    seeds: list[Seed] = []
    series = sorted(p for p in (SAMPLES / "dicom").glob("ST*/SE*") if p.is_dir())
    for k, folder in enumerate(series):
        files = sorted(folder.iterdir(), key=lambda f: float(
            pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
        run = work / "seeds" / f"series{k}"
        run.mkdir(parents=True, exist_ok=True)
        for f in files[44:68]:  # 24 slices through the middle of the head
            shutil.copy(f, run / f.name)
        seeds.append(Seed(f"dicom/{folder.parent.name}/24 slices", "series", run, series[1 - k] if len(series) == 2
                          else None))
        for f in (files[0], files[len(files) // 2]):
            seeds.append(Seed(f"dicom/{folder.parent.name}/{f.name}", "dicom", f))
    for kind_set in ("hard", "easy"):
        pairs = {}
        for p in sorted((SAMPLES / kind_set).rglob("*.nii.gz")):
            if "derivatives" not in p.parts:
                pairs.setdefault(p.parent if kind_set == "easy" else p.parent.parent, []).append(p)
        for visits in list(pairs.values())[:3]:
            seeds.append(Seed(f"{kind_set}/{visits[-1].relative_to(SAMPLES / kind_set)}", "nifti", visits[-1],
                              visits[0]))
    plain = work / "seeds" / "t1.nii"
    plain.write_bytes(gzip.decompress(seeds[-1].path.read_bytes()))
    seeds.append(Seed("easy (uncompressed .nii)", "nifti", plain, seeds[-1].partner))
    seeds = [s for s in seeds if _loads(s.path)]  # e.g. an edge slice that is all zeros is refused as constant
    seeds.extend(_pydicom_seeds())
    return seeds


def _loads(path: Path) -> bool:
    from longitudinal.io import load_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_image(path)
    except Exception:
        return False
    return True


def _pydicom_seeds() -> list[Seed]:
    """pydicom's test files that load as they are (the fuzzing is about what mutations do to good files)."""
    from longitudinal.io import load_image

    root = Path(__import__("pydicom.data", fromlist=["x"]).get_testdata_file("CT_small.dcm")).parent
    out = []
    for path in sorted(root.glob("*.dcm")):
        if path.stat().st_size > 2_000_000:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = load_image(path)
        except Exception:
            continue
        if np.prod(image.size) <= 4_000_000:
            out.append(Seed(f"pydicom/{path.name}", "dicom", path))
    return out


# ----------------------------------------------------------------------------- mutations


@dataclass
class Mutation:
    how: str  # e.g. "bitflip x12", "tag RescaleIntercept='\\x8920'", "nifti pixdim[1]=nan"
    region: str  # "header", "pixels", "gzip" (the compressed stream), "whole" (the file's length changed)
    malformed: bool | None = None  # for a value mutation: was the new value malformed (None: not a value mutation)
    target: str = ""  # the mutated file's name
    pixel_bytes: bool = False  # some of the mutated bytes are pixel data
    malformed_tags: list[str] = field(default_factory=list)  # for a DICOM byte mutation: elements left malformed


def _pixel_offset(data: bytes) -> int:
    """Where the pixel data element starts (little- or big-endian tag), else the end of the file."""
    at = max(data.rfind(b"\xe0\x7f\x10\x00"), data.rfind(b"\x7f\xe0\x00\x10"))
    return at if at > 0 else len(data)


def mutate_bytes(data: bytes, rng: np.random.Generator, header_end: int, start: int = 0) -> tuple[bytes, Mutation]:
    """A byte-level mutation; half of them aimed at the header (bytes `start` to `header_end`)."""
    buf = bytearray(data)
    n = len(buf)

    def position(width: int = 1) -> int:
        if rng.random() < 0.5 and header_end - width > start:
            return int(rng.integers(start, header_end - width))
        return int(rng.integers(0, max(n - width, 1)))

    op = rng.choice(["bitflip", "overwrite", "zero", "truncate", "insert", "delete", "duplicate"])
    if op == "bitflip":
        count = int(rng.choice([1, 2, 8, 64]))
        spots = [position() for _ in range(count)]
        for p in spots:
            buf[p] ^= 1 << int(rng.integers(0, 8))
    elif op in ("overwrite", "zero"):
        width = int(rng.choice([1, 4, 16, 64]))
        p = position(width)
        buf[p:p + width] = bytes(width) if op == "zero" else rng.bytes(width)
        spots = [p, p + width - 1]
    elif op == "truncate":
        p = int(rng.integers(0, n))
        del buf[p:]
        spots = [p]
    elif op == "insert":
        p = position()
        buf[p:p] = rng.bytes(int(rng.choice([1, 2, 7, 64])))
        spots = [p]
    elif op == "delete":
        width = int(rng.choice([1, 2, 7, 64]))
        p = position(width)
        del buf[p:p + width]
        spots = [p]
    else:  # duplicate a run in place (a repeated block)
        width = int(rng.choice([16, 256]))
        p = position(width)
        buf[p:p] = buf[p:p + width]
        spots = [p]
    if op in ("truncate", "insert", "delete", "duplicate"):
        # The lengths the file declares no longer add up: detectable wherever it happened.
        return bytes(buf), Mutation(f"{op} at {sorted(spots)[:4]}", "whole", True)
    region = "pixels" if min(spots) >= header_end else "header"
    return bytes(buf), Mutation(f"{op} at {sorted(spots)[:4]}", region, pixel_bytes=max(spots) >= header_end)


def mutate_dicom_value(path: Path, rng: np.random.Generator) -> tuple[bytes, Mutation]:
    """One DICOM element removed, or set to a malformed, extreme or other well-formed value."""
    import pydicom
    from pydicom import config
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    config.settings.reading_validation_mode = config.IGNORE  # the fuzzer's own process only
    config.settings.writing_validation_mode = config.IGNORE
    ds = pydicom.dcmread(path)
    keyword = str(rng.choice(DICOM_TAGS))
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag)
    op = rng.choice(["delete", "nasty", "number", "scale"])
    if op == "delete" or (op == "scale" and keyword not in ds):
        if keyword in ds:
            del ds[keyword]
        how, value = f"delete {keyword}", None
    elif vr in ("US", "SS", "UL"):
        value = int(rng.choice([0, 1, 2, 3, 7, 8, 12, 13, 16, 17, 32, 33, 64, 255, 4096, 65535]))
        ds[keyword] = pydicom.DataElement(tag, vr, value)
        how = f"{keyword}={value}"
    else:
        if op == "nasty":
            text = str(rng.choice(NASTY_TEXT))
        elif op == "number":
            count = int(rng.choice([1, 2, 3, 6]))
            text = "\\".join(f"{v:.6g}" for v in rng.normal(0, 10.0 ** rng.integers(-3, 6), count))
        else:  # a well-formed scaled copy of the current value
            current = str(ds[keyword].value) if keyword in ds else ""
            parts = [p for p in current.replace("[", "").replace("]", "").replace(",", "\\").split("\\") if p.strip()]
            try:
                text = "\\".join(f"{float(p) * rng.choice([0.5, 2.0, -1.0]):.6g}" for p in parts) or "1"
            except ValueError:
                text = str(rng.choice(NASTY_TEXT))
        how, value = f"{keyword}={text[:40]!r}", text
    malformed = None if value is None else not _well_formed(vr, value)
    raw = None
    if isinstance(value, str):
        raw = value.encode("latin-1") if all(ord(c) < 256 for c in value) else value.encode("utf-8")
        raw = raw.ljust(max(len(raw) + len(raw) % 2, 6), b" ")
        # pydicom validates and converts what is set through it: write a placeholder, then put the bytes in its place.
        placeholder = (b"3141592653589793238462643383279502884197" * 8)[:len(raw)]
        ds[keyword] = pydicom.DataElement(tag, vr, placeholder.decode())
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    if raw is not None:
        at = data.find(placeholder)
        assert 0 <= at < _pixel_offset(data), "placeholder not found in the header"
        data = data[:at] + raw + data[at + len(raw):]
    return data, Mutation(f"value {how}", "header", malformed)


def _well_formed(vr: str, value: object) -> bool:
    """pydicom's own validator, independent of ours: would it accept this value for this VR?"""
    from pydicom import config
    from pydicom.valuerep import validate_value

    if isinstance(value, int) or str(value).strip(" \0") == "":
        return True  # an empty value is allowed for most elements (type 2 and 3)
    try:
        for part in str(value).split("\\"):  # validate_value takes one value at a time
            validate_value(vr, part, config.RAISE)
    except Exception:
        return False
    if vr in ("DS", "IS"):
        try:
            values = [float(v) for v in str(value).split("\\")]
        except ValueError:
            return False
        return all(np.isfinite(values))
    return True


def _dicom_header_malformed(original: bytes, mutated: bytes) -> list[str]:
    """The elements a byte mutation left with a value their VR does not allow (pydicom's rules); ["(header)"]
    when the header no longer parses or its tags changed."""
    import pydicom

    def elements(data: bytes) -> dict:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        out = {}
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            out[int(tag)] = (getattr(raw, "VR", None), getattr(raw, "value", None))
        return out

    try:
        before, after = elements(original), elements(mutated)
    except Exception:
        return ["(header)"]  # no longer parses
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    bad: list[str] = []
    for tag, (vr, value) in after.items():
        if not isinstance(value, bytes):  # sequences and converted values: compared through their items' bytes
            continue
        old = before.get(tag)
        if old is not None and old[0] == vr and isinstance(old[1], bytes) and old[1] == value:
            continue
        name = keyword_for_tag(tag) or f"{tag:08X}"
        try:
            vr = vr or dictionary_VR(tag)
        except KeyError:
            bad.append(name)  # a tag no dictionary knows appeared
            continue
        if vr in ("DS", "IS", "UI", "CS", "DA", "TM", "AS"):
            try:
                text = value.decode("ascii").strip(" \0")
            except UnicodeDecodeError:
                bad.append(name)
                continue
            if not _well_formed(vr, text):
                bad.append(name)
        elif vr in ("US", "SS") and len(value) % 2:
            bad.append(name)
    if set(after) != set(before):
        bad.append("(header)")  # elements appeared or vanished
    return bad


def _nifti_header_malformed(original: bytes, mutated: bytes) -> bool:
    """Whether a byte mutation left a NIfTI header field not finite, a spacing not in (0, 50] or a code invalid."""
    import nibabel as nib

    before = nib.Nifti1Header(original[:348], check=False)
    after = nib.Nifti1Header(mutated[:348], check=False)
    if nib.Nifti1Header.diagnose_binaryblock(after.binaryblock):
        return True  # nibabel itself finds a problem
    for name in NIFTI_FLOATS:
        if not np.array_equal(before[name], after[name], equal_nan=True) and not np.all(np.isfinite(after[name])):
            return True
    n = int(min(max(int(after["dim"][0]), 1), 3))
    return not all(0 < v <= 50 for v in after["pixdim"][1:1 + n])


def mutate_nifti_field(content: bytes, rng: np.random.Generator) -> tuple[bytes, Mutation]:
    """One NIfTI-1 header field set to NaN, infinity, zero, a negative, an extreme or an invalid value."""
    import nibabel as nib

    hdr = nib.Nifti1Header(content[:348], check=False)
    if rng.random() < 0.6:
        name = str(rng.choice(NIFTI_FLOATS))
        choices = [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e-30, 1e30, 60.0, 3.0]
        current = hdr[name]
        index = int(rng.integers(0, current.size)) if current.ndim else None
        old = float(current[index] if index is not None else current)
        value = float(rng.choice(choices + [old * float(rng.choice([0.5, 1.001, 2.0, -1.0]))]))
        if index is not None:
            hdr[name][index] = value
        else:
            hdr[name] = value
        malformed = not np.isfinite(value) or (name == "pixdim" and index in (1, 2, 3) and not 0 < value <= 50)
    else:
        name = str(rng.choice(NIFTI_INTS))
        current = hdr[name]
        index = int(rng.integers(0, current.size)) if current.ndim else None
        value = int(rng.choice([0, -1, 1, 2, 3, 4, 5, 7, 8, 16, 64, 255, 256, 512, 1024, 2000, 32767, -32768]))
        info = np.iinfo(current.dtype)
        value = max(min(value, info.max), info.min)
        if index is not None:
            hdr[name][index] = value
        else:
            hdr[name] = value
        malformed = None  # ints: valid or not is what the checks under test decide; only silence is judged
    return hdr.binaryblock + content[348:], Mutation(f"nifti {name}{f'[{index}]' if index is not None else ''}="
                                                     f"{value!r}", "header", malformed)


def make_case(seed: Seed, index: int, run_seed: int, folder: Path) -> tuple[Path, Mutation]:
    """Write case `index` of `seed` into `folder`; returns the input path to load and what was done."""
    rng = np.random.default_rng([run_seed, index])
    if seed.kind == "series":
        files = sorted(seed.path.iterdir())
        pick = int(rng.choice([0, len(files) - 1, int(rng.integers(0, len(files)))]))
        case = folder / "series"
        case.mkdir()
        for k, f in enumerate(files):
            if k != pick:
                os.symlink(f, case / f.name)
        victim, target = files[pick], case / files[pick].name
    else:
        case = folder / seed.path.name
        victim, target = seed.path, case
    data = victim.read_bytes()
    if seed.kind in ("series", "dicom"):
        value_rng = np.random.default_rng([run_seed, index, 1])
        try:
            value = mutate_dicom_value(victim, value_rng) if rng.random() < 0.45 else None
        except Exception:  # pydicom cannot write this dataset back (an old encoding): mutate its bytes instead
            value = None
        if value is not None:
            data, mutation = value
        else:
            original = data
            data, mutation = mutate_bytes(data, rng, _pixel_offset(data), 128)
            if mutation.region == "header":
                mutation.malformed_tags = _dicom_header_malformed(original, data)
                mutation.malformed = bool(mutation.malformed_tags)
    else:
        gz = victim.name.endswith(".gz")
        content = gzip.decompress(data) if gz else data
        r = rng.random()
        if r < 0.45:
            content, mutation = mutate_nifti_field(content, rng)
            data = gzip.compress(content, compresslevel=1) if gz else content
        elif gz and r < 0.6:  # the compressed stream itself
            data, mutation = mutate_bytes(data, rng, 64)
            mutation.region = "gzip"
        else:
            original = content
            content, mutation = mutate_bytes(content, rng, 352)
            if mutation.region == "header":
                mutation.malformed = _nifti_header_malformed(original, content)
            data = gzip.compress(content, compresslevel=1) if gz else content
    target.write_bytes(data)
    mutation.target = target.name
    return case, mutation


# ----------------------------------------------------------------------------- the worker


def _worker(conn) -> None:
    """Loads cases sent by the parent; answers with the outcome. Runs in its own process."""
    import logging

    logging.disable(logging.CRITICAL)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core per worker on a shared machine
    from longitudinal.errors import InputError
    from longitudinal.io import describe, load_image

    references: dict[str, object] = {}
    while True:
        job = conn.recv()
        if job is None:
            return
        case, reference = Path(job["case"]), job["reference"]
        result: dict[str, object] = {}
        for name, fn in (("describe", describe), ("load", load_image)):
            try:
                image = fn(case)
                result[name] = "ok"
            except InputError as exc:
                result[name] = "error"
                result[f"{name}_message"] = str(exc)
                continue
            except Exception as exc:  # a traceback: the finding the harness is for
                result[name] = "traceback"
                result[f"{name}_message"] = f"{type(exc).__name__}: {exc}"[:300]
                result["traceback"] = traceback.format_exc()[-2000:]
                continue
            if name == "load":
                if reference not in references:
                    references[reference] = load_image(reference)  # seeds are chosen to load
                result["changed"] = _difference(references[reference], image)
        conn.send(result)


def _difference(a, b) -> str | None:
    """How image `b` differs from `a` in geometry or voxels (None: the same)."""
    if a.size != b.size:
        return f"size {a.size} -> {b.size}"
    for what in ("spacing", "origin", "direction"):
        if not np.allclose(getattr(a, what), getattr(b, what), rtol=1e-6, atol=1e-6):
            return f"{what} {np.round(getattr(a, what), 4).tolist()} -> {np.round(getattr(b, what), 4).tolist()}"
    x, y = a.array, b.array
    if x.shape != y.shape or not np.allclose(x.astype(np.float64), y.astype(np.float64), rtol=0, atol=1e-6,
                                             equal_nan=False):
        diff = int(np.count_nonzero(~np.isclose(x.astype(np.float64), y.astype(np.float64), rtol=0, atol=1e-6))) \
            if x.shape == y.shape else -1
        return f"voxel values ({diff} differ)"
    return None


class Loader:
    """A worker process with a per-case timeout; restarted after a crash or a hang."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        self.conn = parent

    def run(self, case: Path, reference: Path) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send({"case": str(case), "reference": str(reference)})
        if self.conn.poll(self.timeout):
            try:
                return self.conn.recv()
            except EOFError:  # the worker died: a crash
                self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            self.proc = None
            return {"hang": True}
        code = self.proc.exitcode
        self.proc = None
        return {"crash": code}

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()


# ----------------------------------------------------------------------------- judging


@dataclass
class Case:
    index: int
    seed: str
    mutation: dict
    outcome: str  # ok, error, traceback, crash, hang
    classes: list[str] = field(default_factory=list)  # findings and notes, see FINDINGS
    detail: str = ""


def judge(index: int, seed: Seed, mutation: Mutation, case: Path, result: dict) -> Case:
    out = Case(index, seed.name, asdict(mutation), "ok")
    if "hang" in result:
        out.outcome, out.classes = "hang", ["hang"]
        return out
    if "crash" in result:
        out.outcome, out.classes, out.detail = "crash", ["crash"], f"worker exit code {result['crash']}"
        return out
    outcomes = {result.get("describe"), result.get("load")}
    if "traceback" in outcomes:
        out.outcome, out.classes = "traceback", ["traceback"]
        out.detail = f"{result.get('load_message') or result.get('describe_message')} | {result.get('traceback')}"
        return out
    for name in ("describe", "load"):
        message = result.get(f"{name}_message")
        if message is not None:
            if str(case) not in message or "\n" in message or any(ord(c) < 32 for c in message):
                out.classes.append("unnamed")
                out.detail = f"{name}: {message[:300]}"
    out.outcome = "error" if result.get("load") == "error" else "ok"
    changed = result.get("changed")
    if out.outcome == "ok" and changed:
        out.detail = changed
        if mutation.region == "pixels" or (mutation.pixel_bytes and changed.startswith("voxel values")):
            out.classes.append("silent-pixels")  # no checksum to tell
        elif mutation.region == "gzip" or (mutation.malformed and _relevant(mutation, changed)):
            out.classes.append("silent-malformed")  # (gzip carries a checksum)
        else:
            out.classes.append("silent-wellformed")  # the header now describes another image, consistently
    return out


# What a silent change of each kind could have come from: a malformed element elsewhere does not explain it.
_GEOMETRY_TAGS = {"ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing",
                  "Rows", "Columns", "NumberOfFrames", "GridFrameOffsetVector", "SharedFunctionalGroupsSequence",
                  "PerFrameFunctionalGroupsSequence", "SeriesInstanceUID", "(header)"}
_VALUE_TAGS = {"RescaleSlope", "RescaleIntercept", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
               "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "TransferSyntaxUID",
               "Rows", "Columns", "NumberOfFrames", "ModalityLUTSequence", "(header)"}


def _relevant(mutation: Mutation, changed: str) -> bool:
    """Whether the mutation's malformed elements could explain the change (value mutations always can)."""
    if not mutation.malformed_tags:
        return True
    tags = _VALUE_TAGS if changed.startswith("voxel values") else _GEOMETRY_TAGS
    return bool(tags & set(mutation.malformed_tags))


def compare_case(seed: Seed, case: Path, work: Path, pipeline: Path, timeout: float) -> tuple[str, str]:
    """`longitudinal compare` on (partner, mutated input): ("ok"|"error"|"compare-bug", detail)."""
    out = work / "compare-out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "longitudinal.cli", "compare", str(seed.partner), str(case), "-o", str(out),
           "--pipeline", str(pipeline), "--allow-mixed-patients"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "compare-bug", f"timeout after {timeout:.0f} s"
    errors = [line for line in done.stderr.splitlines() if line.startswith("longitudinal: ")]
    if done.returncode == 0 and "Traceback" not in done.stderr:
        return "ok", done.stdout.strip()[:200]
    if done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr and (
            str(case) in errors[0] or str(seed.partner) in errors[0]):
        return "error", errors[0][:300]
    return "compare-bug", f"exit {done.returncode}: {done.stderr.strip()[-600:]}"


# ----------------------------------------------------------------------------- the run


@dataclass
class Report:
    cases: int
    seconds: float
    outcomes: dict
    classes: dict
    findings: list[dict]
    compares: list[dict]

    def line(self) -> str:
        return (f"{self.cases} cases in {self.seconds:.0f} s: outcomes {dict(self.outcomes)}; classes "
                f"{dict(self.classes)}; {len(self.findings)} finding(s); {len(self.compares)} compare run(s)")


def run(cases: int, seed: int = 1, compare: int = 0, timeout: float = 60.0, compare_timeout: float = 300.0,
        out: Path | None = None, replay: int | None = None, keep: bool = False, progress: bool = False,
        first: int = 0) -> Report:
    """Fuzz `cases` mutated inputs (or only case `replay`); see the module docstring for the oracle."""
    start = time.perf_counter()
    warnings.simplefilter("ignore")  # pydicom's complaints about the values this process writes on purpose
    work = Path(tempfile.mkdtemp(prefix="longitudinal-fuzz-"))
    loader = Loader(timeout)
    outcomes: Counter = Counter()
    classes: Counter = Counter()
    findings, compares = [], []
    log = open(out, "w") if out else None
    try:
        seeds = make_seeds(work)
        pipeline = work / "cheap.toml"
        pipeline.write_text(CHEAP_PIPELINE)
        paired = [i for i in range(cases) if seeds[i % len(seeds)].partner is not None]
        compare_at = set(np.random.default_rng([seed, 10**9]).choice(paired, size=min(compare, len(paired)),
                                                                    replace=False).tolist()) if paired else set()
        indices = [replay] if replay is not None else range(first, cases)
        for index in indices:
            s = seeds[index % len(seeds)]
            folder = work / f"case{index}"
            folder.mkdir()
            try:
                case, mutation = make_case(s, index, seed, folder)
            except Exception as exc:  # the harness could not build this case: counted, never a finding
                outcomes["not built"] += 1
                print(f"case {index}: not built ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            result = loader.run(case, s.path)
            verdict = judge(index, s, mutation, case, result)
            if index in compare_at:
                status, detail = compare_case(s, case, work, pipeline, compare_timeout)
                compares.append({"index": index, "status": status, "detail": detail})
                if status == "compare-bug":
                    verdict.classes.append("compare-bug")
                    verdict.detail += f" | compare: {detail}"
            outcomes[verdict.outcome] += 1
            classes.update(verdict.classes)
            if any(c in FINDINGS for c in verdict.classes):
                findings.append(asdict(verdict))
            if log:
                log.write(json.dumps(asdict(verdict)) + "\n")
            if replay is not None or progress and index % 500 == 0:
                print(f"case {index}: {verdict.outcome} {verdict.classes} {mutation.how} {verdict.detail}"[:400],
                      file=sys.stderr)
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        loader.close()
        if log:
            log.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"cases kept in {work}", file=sys.stderr)
    return Report(len(indices), time.perf_counter() - start, dict(outcomes), dict(classes), findings, compares)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--compare", type=int, default=0, help="run `longitudinal compare` on this many cases")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--out", type=Path, help="one JSON line per case")
    parser.add_argument("--replay", type=int, help="run only this case index (with the same --seed)")
    parser.add_argument("--keep", action="store_true", help="keep the mutated files")
    parser.add_argument("--first", type=int, default=0, help="start at this case index (to narrow a finding down)")
    args = parser.parse_args(argv)
    report = run(args.cases, args.seed, args.compare, args.timeout, out=args.out, replay=args.replay, keep=args.keep,
                 progress=True, first=args.first)
    print(report.line())
    for f in report.findings[:50]:
        print(json.dumps(f)[:600])
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
