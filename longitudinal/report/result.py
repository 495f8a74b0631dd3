"""`result.json`: every number of one comparison as plain JSON, de-identified field by field when asked.

The page is rendered from this document too, so what a program reads and what a person reads cannot differ.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..compare import Comparison, ScoredRegion
from ..io import Image
from .context import OutputContext
from .deid import HIDDEN, scrub, scrub_all
from .wording import interval_days

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]

UNITS = {
    "centre_mm": "mm, physical LPS coordinates (x: patient right->left, y: anterior->posterior, z: inferior->superior)",
    "centre_index": "voxel index (x, y[, z]) on the baseline grid, from 0",
    "slices": "voxel index on the baseline grid (from 0) of the slice through the region's centre, per plane",
    "bbox": "voxel index (x, y[, z]) on the baseline grid, lo inclusive, hi exclusive",
    "volume_mm3": "changed tissue (findings) or region size, cubic spatial_unit (2D: square spatial_unit)",
    "diameter_mm": "largest extent of the changed tissue, in spatial_unit",
    "mean_change_pct": "mean intensity change of the changed tissue, % of the baseline (+: brighter at follow-up)",
    "spatial_unit": "mm, or px for 2D pictures that carry no physical pixel size (the *_mm fields are then px)",
    "spacing_mm": "mm per voxel along (x, y[, z])",
    "size": "voxels along (x, y[, z])",
    "score": "calibrated change score: -log10 of the chance that an unchanged region scores this high; flagged above threshold",
    "progression_score": "calibrated change score (dimensionless); progression when above threshold; null when not comparable",
    "strongest_change": "peak of the pooled intensity change less its surround, in units of what noise and "
                        "misalignment alone produce; ranks pairs (progression_score does not); null when not comparable",
    "threshold": "same scale as score",
    "false_alarm_rate": "fraction of unchanged regions expected above the threshold (0..1)",
    "false_findings_per_pair": "expected false findings in a pair without real change",
    "interval_days": "days from the baseline's to the follow-up's study date",
    "timings_s": "seconds",
    "change_map": "score per voxel, same scale as score",
}
FILES = {
    "report": "report.html",
    "result": "result.json",
    "regions": "regions.csv",
    "change_map": "change_map.nii.gz",
    "flagged_mask": "flagged_mask.nii.gz",
    "registered": "registered.nii.gz",
    "transform": "transform.tfm",
}


def jsonable(value: object) -> JsonValue:
    """Plain JSON types from numpy scalars/arrays, tuples, paths and dataclasses; non-finite floats become null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def ordered_regions(regions: Sequence[ScoredRegion]) -> list[ScoredRegion]:
    """Flagged first, then by score (highest first), then id: the order every listing uses."""
    def key(r: ScoredRegion):
        s = float(r.score)
        return (not r.flagged, -s if math.isfinite(s) else math.inf, r.id)

    return sorted(regions, key=key)


def spatial_unit(image: Image) -> str:
    """'px' for 2D pictures without a physical pixel size (SimpleITK gives them spacing 1), else 'mm'."""
    if image.dim == 2 and all(s == 1.0 for s in image.spacing):
        return "px"
    return "mm"


def centre_index(region: ScoredRegion) -> tuple[int, ...]:
    """The region's centre voxel on the baseline grid: its own when measured, else the middle of its box."""
    if region.centre_index is not None:
        return tuple(int(v) for v in region.centre_index)
    return tuple(int((lo + hi - 1) // 2) for lo, hi in zip(*region.bbox))


def slice_numbers(index: Sequence[int], reference: sitk.Image) -> dict[str, int]:
    """Baseline voxel index of the axial, coronal and sagittal slices through `index` (the stored axis closest
    to each patient axis), as a viewer scrolling the baseline file shows them; 2D: the pixel x, y."""
    if reference.GetDimension() == 2 or len(index) == 2:
        return {"x": int(index[0]), "y": int(index[1])}
    d = np.abs(np.array(reference.GetDirection()).reshape(3, 3))  # column a: stored axis a in LPS
    patient_axis_of = np.argmax(d, axis=0)  # for each stored axis, the patient axis it runs along
    out = {}
    for stored, patient in enumerate(patient_axis_of):
        out[("sagittal", "coronal", "axial")[int(patient)]] = int(index[stored])
    return out


def _visit_block(image: Image, role: str, context: OutputContext) -> dict:
    m = image.meta
    notes, choice = tuple(m.notes), m.series_choice
    description = m.series_description
    if context.deidentify:
        description = scrub(description, context.secrets)
        choice = scrub(choice, context.secrets)
        notes = tuple(scrub_all(notes, context.secrets))
    return {
        "role": role,
        "study_date": m.study_date,
        "study_date_source": m.study_date_source,
        "study_time": m.study_time,
        "modality": m.modality,
        "series_description": description,
        "series_choice": choice,
        "notes": list(notes),
        "series_uid": None if context.deidentify else m.series_uid,
        "sources": [] if context.deidentify else list(m.sources),
        "size": list(image.size),
        "spacing_mm": [float(s) for s in image.spacing],
        "origin_mm": [float(s) for s in image.origin],
        "direction": [float(s) for s in image.direction],
        "orientation": (sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.itk.GetDirection())
                        if image.dim == 3 else None),
        "rgb": image.is_rgb,
    }


def _patient_block(comparison: Comparison, context: OutputContext) -> dict:
    name = comparison.baseline.meta.patient_name or comparison.followup.meta.patient_name
    if not context.deidentify:
        return {"id": context.patient_id, "name": name, "deidentified": False}
    return {"id": context.pseudonym, "name": HIDDEN if name else None, "deidentified": True}


def _registration_block(comparison: Comparison) -> dict:
    reg = comparison.registration
    fields = jsonable(reg.qc)
    assert isinstance(fields, dict)
    fields["suspect"] = bool(reg.qc.suspect)
    fields["reasons"] = list(reg.qc.reasons)
    fields["transform_file"] = FILES["transform"]
    fields["transform_kind"] = reg.transform.GetName()
    fields["transform_direction"] = "maps baseline (fixed) points to follow-up (moving) points"
    return fields


def _pipeline_block(comparison: Comparison) -> dict:
    p = comparison.pipeline
    return {"name": p.name, "version": p.version, "modality": p.modality, "source": jsonable(p.source),
            "settings": jsonable(p.stages)}


def _region_block(r: ScoredRegion, reference: sitk.Image) -> dict:
    return {
        "id": r.id, "label": r.label, "centre_mm": list(r.centre_mm), "bbox": [list(r.bbox[0]), list(r.bbox[1])],
        "volume_mm3": r.volume_mm3, "score": r.score, "flagged": bool(r.flagged), "stats": dict(r.stats),
        "diameter_mm": r.diameter_mm, "mean_change_pct": r.mean_change_pct, "n_voxels": r.n_voxels,
        "centre_index": None if r.centre_index is None else list(r.centre_index),
        "slices": slice_numbers(centre_index(r), reference),
    }


def _threshold_setting(comparison: Comparison) -> dict:
    """How the threshold was chosen, as the comparison states it: expected false findings per stable pair (the
    pipeline's newer setting) and/or the older false-alarm rate per region."""
    out = {}
    for name in ("false_findings_per_pair", "false_alarm_rate"):
        value = getattr(comparison, name, None)  # either may be absent while the setting changes
        if value is not None:
            out[name] = float(value)
    return out


def result_document(comparison: Comparison, context: OutputContext) -> dict:
    """result.json's content. `context` must be resolved (`OutputContext.resolved`)."""
    ordered = ordered_regions(comparison.regions)
    reference = comparison.baseline.itk
    registration = _registration_block(comparison)
    reason, warnings = comparison.reason, list(comparison.warnings)
    if context.deidentify:  # free text may quote file names or header fields
        registration["reasons"] = scrub_all(registration["reasons"], context.secrets)
        reason = scrub(reason, context.secrets)
        warnings = scrub_all(warnings, context.secrets)
    visits = [_visit_block(comparison.baseline, "baseline", context),
              _visit_block(comparison.followup, "followup", context)]

    doc = {
        "verdict": comparison.verdict,
        "progression": bool(comparison.progression),
        "progression_score": None if comparison.progression_score is None else float(comparison.progression_score),
        "strongest_change": (None if comparison.strongest_change is None
                             else round(float(comparison.strongest_change), 3)),
        "reason": reason,
        "warnings": warnings,
        "identical_inputs": bool(comparison.identical),
        "threshold": float(comparison.threshold),
        **_threshold_setting(comparison),
        "n_regions": len(ordered),
        "n_flagged": sum(1 for r in ordered if r.flagged),
        "n_regions_scored": int(comparison.regions_scored),
        "interval_days": interval_days(visits[0]["study_date"], visits[1]["study_date"]),
        "spatial_unit": spatial_unit(comparison.baseline),
        "patient": _patient_block(comparison, context),
        "visits": visits,
        "registration": registration,
        "pipeline": _pipeline_block(comparison),
        "encoder": jsonable(dict(comparison.encoder)),
        "longitudinal_version": __version__,
        "created": context.created,
        "files": dict(FILES),
        "change_map_grid": "follow-up (2D inputs written as single-slice volumes)",
        "units": UNITS,
        "timings_s": {k: float(v) for k, v in comparison.timings_s.items()},
        "regions": [_region_block(r, reference) for r in ordered],
    }
    out = jsonable(doc)
    assert isinstance(out, dict)
    return out
