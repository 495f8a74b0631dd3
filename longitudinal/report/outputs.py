"""A pair's output folder: a registry of output writers, each file checked after writing, and `.complete`.

A writer is a function `(comparison, folder, context) -> list of paths written`. It writes its files into the
pair's folder, each atomically (`io.atomic_write`), leaves identifiers out when `context.deidentify`, and raises
when it cannot write. `write_outputs` runs every writer of a mapping (`WRITERS` by default; add one with
`{**WRITERS, "dicom_seg": write_seg}`), reads every returned file back, and only then writes `.complete`,
which lists the verified files with their sizes: a folder without it is unfinished, and `is_complete`
re-checks every listed file before a batch skips the pair.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType

import numpy as np
import SimpleITK as sitk

from .. import __version__
from .. import io as lio
from ..errors import OutputError
from ..compare import Comparison, ScoredRegion
from ..io import Image
from . import figures as fg
from .context import OutputContext
from .page import Figure, Figures, finding_title, report_page
from .result import FILES, jsonable, ordered_regions, result_document
from .wording import slices_text

log = logging.getLogger(__name__)

COMPLETE = ".complete"
OutputWriter = Callable[[Comparison, Path, OutputContext], list[Path]]


# --------------------------------------------------------------------------- images


def _clean_itk(itk: sitk.Image) -> sitk.Image:
    """A copy without the metadata dictionary: NIfTI writes some keys (ITK_FileNotes, aux_file) into its header."""
    out = sitk.Image(itk)
    for key in out.GetMetaDataKeys():
        out.EraseMetaData(key)
    return out


def as_volume(itk: sitk.Image) -> sitk.Image:
    """2D images become single-slice 3D images on the same in-plane grid, so every tool reads them as volumes."""
    return itk if itk.GetDimension() == 3 else sitk.JoinSeries(itk)


def _write_nifti(path: Path, itk: sitk.Image) -> Path:
    return lio.save_image(Image(_clean_itk(as_volume(itk))), path)


def write_images(comparison: Comparison, folder: Path, context: OutputContext) -> list[Path]:
    """change_map.nii.gz (float32) and flagged_mask.nii.gz (uint8), on the follow-up's own grid."""
    return [_write_nifti(folder / FILES["change_map"], sitk.Cast(comparison.change_map.itk, sitk.sitkFloat32)),
            _write_nifti(folder / FILES["flagged_mask"], sitk.Cast(comparison.flagged_mask.itk, sitk.sitkUInt8))]


def write_registration(comparison: Comparison, folder: Path, context: OutputContext) -> list[Path]:
    """registered.nii.gz (follow-up on the baseline grid), transform.tfm and qc.json, via `Registration.save`
    (given the metadata-free, volume-shaped copy of the registered image)."""
    reg = comparison.registration
    registered = comparison.registered.with_itk(_clean_itk(as_volume(comparison.registered.itk)))
    dataclasses.replace(reg, registered=registered).save(folder)
    return [folder / FILES["registered"], folder / FILES["transform"], folder / "qc.json"]


# --------------------------------------------------------------------------- tables


def _stat_keys(regions: list[ScoredRegion]) -> list[str]:
    keys: list[str] = []
    for r in regions:
        keys.extend(k for k in r.stats if k not in keys)
    return keys


def regions_csv(regions: list[ScoredRegion]) -> str:
    keys = _stat_keys(regions)
    fields = ["id", "label", "flagged", "score", "centre_x_mm", "centre_y_mm", "centre_z_mm", "volume_mm3",
              "diameter_mm", "mean_change_pct", "n_voxels", "bbox_lo", "bbox_hi", *keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in regions:
        centre = list(r.centre_mm) + [None] * (3 - len(r.centre_mm))
        row = {"id": r.id, "label": r.label, "flagged": bool(r.flagged), "score": r.score, "centre_x_mm": centre[0],
               "centre_y_mm": centre[1], "centre_z_mm": centre[2], "volume_mm3": r.volume_mm3,
               "diameter_mm": r.diameter_mm, "mean_change_pct": r.mean_change_pct, "n_voxels": r.n_voxels,
               "bbox_lo": " ".join(str(int(v)) for v in r.bbox[0]), "bbox_hi": " ".join(str(int(v)) for v in r.bbox[1]),
               **{k: r.stats.get(k) for k in keys}}
        writer.writerow({k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def write_regions_csv(comparison: Comparison, folder: Path, context: OutputContext) -> list[Path]:
    return [lio.atomic_write_text(folder / FILES["regions"], regions_csv(ordered_regions(comparison.regions)))]


def write_result_json(comparison: Comparison, folder: Path, context: OutputContext) -> list[Path]:
    text = json.dumps(result_document(comparison, context), indent=2, allow_nan=False) + "\n"
    return [lio.atomic_write_text(folder / FILES["result"], text)]


# --------------------------------------------------------------------------- the page


def _figures(comparison: Comparison, doc: Mapping, context: OutputContext) -> Figures:
    settings = context.settings
    d = fg.display(comparison, settings)
    ordered = ordered_regions(comparison.regions)
    if comparison.verdict == "not comparable":
        uri = fg.alignment_figure(d, settings)
        return Figures(alignment=Figure(uri, "baseline and registered follow-up",
                                        "Baseline and follow-up after the attempted registration, each in its own "
                                        "grey window. Misaligned anatomy here is why no change was scored."))
    is3d = comparison.baseline.dim == 3
    overview = Figure(fg.overview_figure(d, ordered, settings), "overview of the findings",
                      ("Axial slices of the baseline, seen from the feet (anterior up, patient left on the image "
                       "right); slice numbers are the baseline file's own. " if is3d else
                       "The baseline picture as stored. ")
                      + "Findings are filled yellow and numbered as in the table; dashed cyan boxes are regions "
                        "that scored below the threshold; hatched tissue was imaged at one visit only and not "
                        "compared.")
    findings = [r for r in ordered if r.flagged][: settings.max_region_figures]
    drawn = []
    if findings:
        drawer = fg.FindingFigures(d, settings)
        docs = {r["id"]: r for r in doc["regions"]}
        for r in findings:
            title = finding_title(docs[r.id], doc)
            where = slices_text(docs[r.id].get("slices") or {})
            uri = drawer.render(r, f"{title} · {where}")
            where_text = (f"slices through its centre ({where}; baseline voxel index)" if is3d
                          else f"around its centre ({where})")
            window = ("" if comparison.baseline.is_rgb else
                      "Baseline and follow-up share one grey window, fitted to the tissue around the finding. ")
            drawn.append(Figure(uri, f"finding {r.id}",
                                f"Finding {r.id}, {where_text}. {window}Difference: red = brighter at follow-up, "
                                "blue = darker; grey = not compared. Score overlay: faint below the threshold, solid "
                                "above it.", anchor=f"figure-{r.id}"))
    return Figures(overview=overview, findings=tuple(drawn))


def write_report_html(comparison: Comparison, folder: Path, context: OutputContext) -> list[Path]:
    """report.html: one self-contained page (CSS inline, figures as base64 PNG, no network)."""
    doc = result_document(comparison, context)
    page = report_page(doc, _figures(comparison, doc, context), context.settings, context.summary_href)
    return [lio.atomic_write_text(folder / FILES["report"], page)]


WRITERS: Mapping[str, OutputWriter] = MappingProxyType({
    "images": write_images,
    "registration": write_registration,
    "regions": write_regions_csv,
    "result": write_result_json,
    "report": write_report_html,
})


# --------------------------------------------------------------------------- checks and the stamp


def check_file(path: Path, full: bool = True) -> str | None:
    """Why `path` is not a readable file of its kind, or None. full: read all of it (right after writing);
    otherwise the header only (resume)."""
    try:
        if path.stat().st_size == 0:
            return "empty"
        name = path.name.lower()
        if name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            if full and name.endswith(".gz"):  # ITK reads a cut-off gzip stream without complaint: check it here
                with gzip.open(path, "rb") as stream:
                    while stream.read(1 << 20):
                        pass
            elif full and name.endswith(".nii"):
                bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
                voxels = int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents()
                if bits and path.stat().st_size < 352 + voxels * int(bits.group(1)) // 8:
                    return "shorter than its header says"
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith(".csv"):
            rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
            if not rows or any(len(r) != len(rows[0]) for r in rows):
                return "not a complete table"
        elif name.endswith((".html", ".htm")):
            if not path.read_text(encoding="utf-8").rstrip().endswith("</html>"):
                return "the page is cut off"
        elif name.endswith(".tfm"):
            sitk.ReadTransform(str(path))
        elif name.endswith(".dcm"):
            import pydicom

            pydicom.dcmread(path, stop_before_pixels=not full)
    except (OSError, EOFError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        return " ".join(str(exc).split())[:200] or type(exc).__name__
    except Exception as exc:  # a reader's own error type (e.g. pydicom's InvalidDicomError)
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def is_complete(out_dir: str | os.PathLike, stamp: Mapping | None = None) -> bool:
    """True when `write_outputs` finished in out_dir with this stamp, and every file it listed is still there
    with its size and a readable header."""
    folder = Path(out_dir)
    try:
        record = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))
        files = record["files"]
        if stamp is not None and record.get("stamp") != jsonable(dict(stamp)):
            return False
        for name, info in files.items():
            path = folder / name
            if path.stat().st_size != info["size"] or check_file(path, full=False) is not None:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(files)


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        raise OutputError(f"{path}: an output writer wrote outside the pair's folder {folder}") from None


def _run_writer(name: str, writer: OutputWriter, comparison: Comparison, out: Path,
                context: OutputContext) -> tuple[list[Path], float]:
    """(paths written and read back, seconds) of one writer; OutputError naming the file when it fails."""
    t0 = time.perf_counter()
    try:
        paths = [Path(p) for p in writer(comparison, out, context)]
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the {name} output ({exc.strerror or exc})") from exc
    for path in paths:
        problem = check_file(path, full=True)
        if problem is not None:
            raise OutputError(f"{path}: written but does not read back ({problem}); is the disk full?")
    return paths, round(time.perf_counter() - t0, 3)


def write_outputs(
    comparison: Comparison,
    out_dir: str | os.PathLike,
    context: OutputContext = OutputContext(),
    *,
    stamp: Mapping | None = None,
    writers: Mapping[str, OutputWriter] = WRITERS,
) -> dict[str, Path]:
    """Run every writer into out_dir, read back every file written, then write `.complete`.

    context: de-identification, the batch link and page settings (`OutputContext`). stamp: anything that
    identifies the inputs (file sizes and times, pipeline hash), stored in `.complete` so that
    `is_complete(out_dir, stamp)` tells a later run whether this folder is still current.
    Returns {file name relative to out_dir: path}. Raises OutputError, naming the folder or file, when a file
    cannot be written or does not read back; `.complete` is then absent.
    """
    out = Path(out_dir)
    context = context.resolved(comparison)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / COMPLETE).unlink(missing_ok=True)  # an interrupted rewrite must not look finished
    except OSError as exc:
        raise OutputError(f"{out}: cannot write there ({exc.strerror or exc})") from exc
    # Writers run two at a time: the NIfTI ones spend their time in ITK's and zlib's compression, outside the GIL,
    # while the page draws its figures. Results are taken in the mapping's order, so the first writer that fails
    # is the one reported, and the files listed are the same as one at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [(name, pool.submit(_run_writer, name, writer, comparison, out, context))
                for name, writer in writers.items()]
        done = [(name, run.result()) for name, run in runs]
    written = {_relative(path, out): path for _, (paths, _) in done for path in paths}
    seconds = {name: s for name, (_, s) in done}
    record = {"files": {rel: {"size": p.stat().st_size} for rel, p in sorted(written.items())},
              "stamp": jsonable(dict(stamp)) if stamp is not None else None, "created": context.created,
              "longitudinal_version": __version__, "deidentified": context.deidentify, "seconds": seconds}
    try:
        lio.atomic_write_text(out / COMPLETE, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"{out / COMPLETE}: cannot write ({exc.strerror or exc})") from exc
    if check_file(out / COMPLETE) is not None:
        (out / COMPLETE).unlink(missing_ok=True)
        raise OutputError(f"{out / COMPLETE}: written but does not read back; is the disk full?")
    log.info("outputs written in %.1f s", sum(seconds.values()))
    return written
