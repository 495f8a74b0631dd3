"""The report stage's output contract, on Comparisons built from real scans (nilearn's MNI152, scikit-image's retina).

`make_comparison` is test scaffolding standing in for `compare.compare` (not written yet): it runs the real
registration and harmonisation, then scores grid regions by the robust z of |follow-up - baseline|, which
is honest about what changed (a lesion the test painted into the follow-up) without the encoder.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import json
import math
import os
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import norm

from longitudinal import report
from longitudinal.compare import Comparison, ScoredRegion
from longitudinal.io import Image, Meta
from longitudinal.pipeline import Pipeline
from longitudinal.masks import foreground_mask, luminance
from longitudinal.preprocessing import PreprocessingSettings, harmonise
from longitudinal.regions import RegionSettings, grid_regions
from longitudinal.registration import RegistrationSettings, register

PATIENT_ID = "PSECRET-0042"
PATIENT_NAME = "DOE^JANEWAY"
THRESHOLD = 3.0

TEST_PIPELINE = Pipeline(name="test-absdiff", version="0.1", description="test scaffolding",
                         source="tests/test_report.py")


def mni_path() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@functools.lru_cache(maxsize=None)
def mni(spacing_mm: float) -> sitk.Image:
    """The real MNI152 T1 resampled to a coarse isotropic grid (RAS-stored, as the file is)."""
    img = sitk.ReadImage(str(mni_path()), sitk.sitkFloat32)
    size = [int(round(n * s / spacing_mm)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [spacing_mm] * 3,
                         img.GetDirection())


def with_lesion(itk: sitk.Image, centre_mm, radius_mm: float, delta: float) -> sitk.Image:
    """A copy with a sphere of changed intensity: the ground-truth change."""
    arr = sitk.GetArrayFromImage(itk)
    grids = np.indices(arr.shape[: itk.GetDimension()])  # (z,) y, x: colour channels are not an axis
    idx = itk.TransformPhysicalPointToContinuousIndex(centre_mm)
    sp = itk.GetSpacing()
    d2 = ((grids[-1] - idx[0]) * sp[0]) ** 2 + ((grids[-2] - idx[1]) * sp[1]) ** 2
    if itk.GetDimension() == 3:
        d2 = d2 + ((grids[0] - idx[2]) * sp[2]) ** 2
    out = arr.astype(np.float32)
    out[d2 <= radius_mm**2] += delta
    res = sitk.GetImageFromArray(out, isVector=itk.GetNumberOfComponentsPerPixel() > 1)
    res.CopyInformation(itk)
    return res


def followup_grid_3d(base: sitk.Image, lesion_mm=(20.0, -10.0, 20.0)) -> sitk.Image:
    """Follow-up: lesion added, slightly moved, stored LPS (not RAS) with its own spacing and size."""
    src = with_lesion(base, lesion_mm, 9.0, 60.0)
    ref = sitk.DICOMOrient(base, "LPS")
    sp = [s * 0.93 for s in base.GetSpacing()]
    size = [int(n * s / t) for n, s, t in zip(ref.GetSize(), ref.GetSpacing(), sp)]
    move = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.04, (1.5, -2.0, 1.0))
    origin = [o + 1.3 for o in ref.GetOrigin()]
    return sitk.Resample(src, size, move, sitk.sitkLinear, origin, sp, ref.GetDirection())


def make_comparison(baseline: Image, followup: Image, pipeline=TEST_PIPELINE) -> Comparison:
    """Scaffolding for compare(): real registration + harmonisation, |difference| as the change map; findings
    are the connected voxels above the threshold inside flagged grid regions, measured like compare's."""
    from scipy import ndimage

    t0 = time.perf_counter()
    # rigid, one thread: deterministic scaffolding (the follow-up only moved rigidly)
    settings = RegistrationSettings(stages=("rigid",), iterations=60, init="geometry", shrink_factors=(4, 2),
                                    smoothing_sigmas_mm=(2.0, 1.0), sampling_fraction=0.1, threads=1)
    reg = register(baseline, followup, settings)
    t1 = time.perf_counter()
    prep = PreprocessingSettings(harmonisation="zscore")
    mask = foreground_mask(baseline)
    b_h, f_h = harmonise(baseline, reg.registered, mask, prep)
    t2 = time.perf_counter()
    inside = (sitk.GetArrayFromImage(mask) > 0) & (sitk.GetArrayFromImage(reg.coverage(2.0)) > 0)
    b_arr, f_arr = sitk.GetArrayFromImage(luminance(b_h.itk)), sitk.GetArrayFromImage(luminance(f_h.itk))
    diff = np.abs(f_arr - b_arr)
    med = float(np.median(diff[inside]))
    mad = 1.4826 * float(np.median(np.abs(diff[inside] - med))) or 1.0
    z = np.where(inside, (diff - med) / mad, 0).astype(np.float32)
    ref = luminance(baseline.itk)
    z_img = sitk.GetImageFromArray(z)
    z_img.CopyInformation(ref)
    spacing = baseline.spacing
    grid = RegionSettings(size_mm=10 * spacing[0]) if baseline.dim == 2 else RegionSettings(size_mm=15.0, overlap=0.2)
    scored, flagged_zone = [], np.zeros(z.shape, bool)
    for r in grid_regions(ref, inside, grid):
        values = z[r.slices()][r.members(inside)]
        score = float(np.mean(values)) if values.size else 0.0
        if score > THRESHOLD:
            flagged_zone[r.slices()] |= r.members(inside)
        scored.append((score, r, float(values.max(initial=0))))
    # findings: connected changed voxels in the flagged regions, numbered by their highest region score
    components, n = ndimage.label(flagged_zone & (z > 2 * THRESHOLD))
    raw_b, raw_f = (sitk.GetArrayFromImage(luminance(i.itk)) for i in (baseline, reg.registered))
    voxel_mm3 = float(np.prod(spacing))
    found = []
    for k in range(1, n + 1):
        vox = np.argwhere(components == k)
        if len(vox) < (3 if baseline.dim == 3 else 20):  # specks are noise
            continue
        best = max(s for s, r, _ in scored if s > THRESHOLD and r.members(inside).any()
                   and (components[r.slices()] == k).any())
        extent = (vox.max(0) - vox.min(0) + 1) * np.array(spacing[::-1])
        sel = tuple(vox.T)
        pct = 100 * float(np.mean(raw_f[sel] - raw_b[sel]) / max(np.mean(raw_b[sel]), 1e-6))
        found.append((best, vox, float(np.linalg.norm(extent)), pct))
    found.sort(key=lambda f: -f[0])
    labels_b = np.zeros(z.shape, np.uint16)
    regions_out = []
    for k, (best, vox, diameter, pct) in enumerate(found, start=1):
        labels_b[tuple(vox.T)] = k
        c = vox.mean(0)[::-1]
        regions_out.append(ScoredRegion(
            id=k, label="change", centre_mm=tuple(ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])),
            bbox=(tuple(int(v) for v in vox.min(0)[::-1]), tuple(int(v) for v in vox.max(0)[::-1] + 1)),
            volume_mm3=len(vox) * voxel_mm3, score=best, flagged=True, diameter_mm=diameter, mean_change_pct=pct,
            n_voxels=len(vox), centre_index=tuple(int(round(v)) for v in c),
            stats={"absdiff_z_mean": best}))
    others = sorted((t for t in scored if t[0] <= THRESHOLD), key=lambda t: -t[0])[:20]
    for k, (score, r, peak) in enumerate(others, start=len(found) + 1):
        regions_out.append(ScoredRegion(id=k, label=r.label, centre_mm=r.centre_mm, bbox=r.bbox,
                                        volume_mm3=r.volume_mm3, score=score, flagged=False,
                                        stats={"absdiff_z_mean": score, "absdiff_z_max": peak}))

    def on_baseline(arr) -> Image:
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ref)
        return Image(img)

    labels_f = reg.to_moving(on_baseline(labels_b), Image(luminance(followup.itk)), sitk.sitkNearestNeighbor)
    best = max((s for s, _, _ in scored), default=0.0)
    progression = bool(found)
    return Comparison(
        baseline=baseline, followup=followup, registered=reg.registered, baseline_harmonised=b_h,
        followup_harmonised=f_h, change_map_baseline=Image(z_img), change_map=Image(reg.to_moving(z_img, luminance(followup.itk))),
        flagged_mask=labels_f.with_itk(sitk.Cast(labels_f.itk > 0, sitk.sitkUInt8)), regions=tuple(regions_out),
        progression_score=best, progression=progression, threshold=THRESHOLD, false_alarm_rate=float(norm.sf(THRESHOLD)),
        strongest_change=float(z[inside].max(initial=0.0)),
        registration=reg, pipeline=pipeline, encoder={"name": "absdiff (test)", "weights": "", "sha256": "0" * 64},
        timings_s={"registration": t1 - t0, "preprocessing": t2 - t1, "scoring": time.perf_counter() - t2},
        regions_scored=len(scored), verdict="progression" if progression else "no progression",
        analysis_mask=on_baseline(inside.astype(np.uint8)),
        finding_labels=labels_f.with_itk(sitk.Cast(labels_f.itk, sitk.sitkUInt16)),
        finding_labels_baseline=on_baseline(labels_b),
    )


def meta(date: str, description: str = "T1 MPRAGE") -> Meta:
    return Meta(patient_id=PATIENT_ID, patient_name=PATIENT_NAME, study_date=date, study_time="101500", modality="MR",
                series_description=f"{description} {PATIENT_NAME}", series_uid="1.2.826.0.1.3680043.2.1125.1.42",
                sources=(f"/data/{PATIENT_ID}/{date}/t1.nii.gz",))


@functools.lru_cache(maxsize=None)
def comparison_3d() -> Comparison:
    base = mni(3.0)
    return make_comparison(Image(base, meta("20200102")), Image(followup_grid_3d(base), meta("20210315")))


def retina(size: int = 192) -> sitk.Image:
    from skimage import data, transform

    rgb = (transform.resize(data.retina(), (size, size), anti_aliasing=True) * 255).astype(np.uint8)
    img = sitk.GetImageFromArray(rgb, isVector=True)
    img.SetSpacing((0.06, 0.06))
    return img


@functools.lru_cache(maxsize=None)
def comparison_2d() -> Comparison:
    base = retina()
    lesion = with_lesion(base, (6.5, 5.0), 0.5, -70.0)
    # follow-up on its own grid: other spacing, origin and size, slightly rotated
    move = sitk.Euler2DTransform((5.7, 5.7), 0.03, (0.15, -0.1))
    follow = sitk.Resample(lesion, [196, 197], move, sitk.sitkLinear, (-0.3, -0.2), (0.062, 0.061), (1, 0, 0, 1))
    m = Meta(patient_id=PATIENT_ID, patient_name=PATIENT_NAME, study_date="20190501", modality="OP",
             series_description="fundus", sources=(f"/photos/{PATIENT_ID}_a.png",))
    return make_comparison(Image(base, m), Image(follow, Meta(**{**m.__dict__, "study_date": "20200601"})))


# --------------------------------------------------------------------------- tests


def _grid(itk: sitk.Image):
    return itk.GetSize(), itk.GetSpacing(), itk.GetOrigin(), itk.GetDirection()


def _assert_same_grid(written: sitk.Image, reference: sitk.Image) -> None:
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def out3d(tmp_path_factory):
    out = tmp_path_factory.mktemp("report3d")
    paths = report.write_outputs(comparison_3d(), out)
    return out, paths


def _page(folder: Path) -> str:
    return (folder / "report.html").read_text(encoding="utf-8")


def _text(page: str) -> str:
    """The page's visible words: tags and embedded pictures out, entities decoded, spaces collapsed."""
    import html

    page = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


EXPECTED_FILES = {"report.html", "result.json", "regions.csv", "change_map.nii.gz", "flagged_mask.nii.gz",
                  "registered.nii.gz", "transform.tfm", "qc.json"}


def test_every_output_file_is_written_verified_and_listed_in_complete(out3d):
    out, paths = out3d
    assert set(paths) == EXPECTED_FILES
    for name, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, name
    record = json.loads((out / report.COMPLETE).read_text())
    assert set(record["files"]) == EXPECTED_FILES
    assert all(record["files"][n]["size"] == (out / n).stat().st_size for n in EXPECTED_FILES)
    assert report.is_complete(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != report.COMPLETE]  # no temp files


def test_result_json_contract(out3d):
    out, _ = out3d
    c = comparison_3d()
    r = json.loads((out / "result.json").read_text())
    assert r["verdict"] == "progression" and r["progression"] is True and r["reason"] is None
    assert r["progression_score"] == pytest.approx(c.progression_score)
    assert r["threshold"] == THRESHOLD and 0 < r["false_alarm_rate"] < 1
    assert r["interval_days"] == 438 and r["spatial_unit"] == "mm" and r["identical_inputs"] is False
    assert len(r["regions"]) == len(c.regions) > 0 and r["n_flagged"] == len(c.findings) > 0
    for reg in r["regions"]:
        assert set(reg) == {"id", "label", "centre_mm", "bbox", "volume_mm3", "score", "flagged", "stats", "diameter_mm",
                            "mean_change_pct", "n_voxels", "centre_index", "slices"}
        assert len(reg["centre_mm"]) == 3 and len(reg["bbox"]) == 2 and isinstance(reg["flagged"], bool)
        assert set(reg["slices"]) == {"axial", "coronal", "sagittal"}
    keys = [(not g["flagged"], -g["score"]) for g in r["regions"]]
    assert keys == sorted(keys)  # findings first, then by score
    assert [g["id"] for g in r["regions"] if g["flagged"]] == list(range(1, r["n_flagged"] + 1))
    assert r["registration"]["transform_file"] == "transform.tfm"
    assert isinstance(r["registration"]["suspect"], bool) and 0 < r["registration"]["dice"] <= 1
    assert r["pipeline"]["name"] == "test-absdiff" and r["pipeline"]["version"] == "0.1"
    assert r["encoder"]["sha256"] == "0" * 64 and r["longitudinal_version"]
    assert set(r["timings_s"]) >= {"registration", "scoring"} and all(v >= 0 for v in r["timings_s"].values())
    assert {"volume_mm3", "centre_mm", "slices", "spatial_unit"} <= set(r["units"])
    assert r["patient"]["id"] == PATIENT_ID and [v["study_date"] for v in r["visits"]] == ["20200102", "20210315"]
    assert r["created"] == json.loads((out / report.COMPLETE).read_text())["created"]


def test_slice_numbers_are_the_baseline_files_own(out3d):
    """MNI is stored RAS: x and y run the other way from LPS, so the slice numbers are the file's, not the view's."""
    out, _ = out3d
    c = comparison_3d()
    top = json.loads((out / "result.json").read_text())["regions"][0]
    i, j, k = top["centre_index"]
    assert top["slices"] == {"sagittal": i, "coronal": j, "axial": k}
    point = c.baseline.itk.TransformIndexToPhysicalPoint((i, j, k))
    assert np.linalg.norm(np.array(point) - np.array(top["centre_mm"])) < 3.0


def test_the_painted_lesion_is_finding_1(out3d):
    """Not a test of the scorer: a check that the report carries the comparison's findings through faithfully."""
    out, _ = out3d
    r = json.loads((out / "result.json").read_text())
    top = r["regions"][0]
    assert top["flagged"] and top["id"] == 1
    assert np.linalg.norm(np.array(top["centre_mm"]) - np.array([20.0, -10.0, 20.0])) < 6.0
    assert top["mean_change_pct"] > 0 and top["diameter_mm"] > 9  # a brighter sphere of 18 mm


def test_regions_csv_matches_result_json(out3d):
    out, _ = out3d
    rows = list(csv.DictReader((out / "regions.csv").open()))
    r = json.loads((out / "result.json").read_text())
    assert [int(row["id"]) for row in rows] == [g["id"] for g in r["regions"]]
    assert {"id", "label", "centre_x_mm", "centre_y_mm", "centre_z_mm", "volume_mm3", "diameter_mm",
            "mean_change_pct", "score", "flagged"} <= set(rows[0])
    assert float(rows[0]["score"]) == pytest.approx(r["regions"][0]["score"], rel=1e-5)


def test_nifti_outputs_are_on_the_followups_own_grid_3d(out3d):
    out, _ = out3d
    c = comparison_3d()
    assert _grid(c.followup.itk) != _grid(c.baseline.itk)  # the test would be empty otherwise
    change = sitk.ReadImage(str(out / "change_map.nii.gz"))
    mask = sitk.ReadImage(str(out / "flagged_mask.nii.gz"))
    _assert_same_grid(change, c.followup.itk)
    _assert_same_grid(mask, c.followup.itk)
    assert change.GetPixelID() == sitk.sitkFloat32 and mask.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(sitk.GetArrayFromImage(change), sitk.GetArrayFromImage(c.change_map.itk), atol=1e-5)
    assert sitk.GetArrayFromImage(mask).sum() > 0
    _assert_same_grid(sitk.ReadImage(str(out / "registered.nii.gz")), c.baseline.itk)
    aff = nib.load(out / "change_map.nii.gz").affine  # nibabel (RAS) agrees on where voxel 0 is
    o = c.followup.itk.GetOrigin()
    np.testing.assert_allclose(aff[:3, 3], [-o[0], -o[1], o[2]], atol=1e-3)


def test_transform_file_reads_back_and_maps_like_the_registration(out3d):
    out, _ = out3d
    c = comparison_3d()
    tx = sitk.ReadTransform(str(out / "transform.tfm"))
    for p in [(0.0, 0.0, 0.0), (30.0, -20.0, 10.0)]:
        np.testing.assert_allclose(tx.TransformPoint(p), c.registration.transform.TransformPoint(p), atol=1e-4)


def test_html_is_self_contained(out3d):
    out, _ = out3d
    page = _page(out)
    assert "http://" not in page and "https://" not in page
    srcs = re.findall(r"""src\s*=\s*['"]([^'"]*)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    import base64

    for s in srcs:  # every embedded picture is a real PNG
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    c = comparison_3d()
    assert len(srcs) == 1 + min(len(c.findings), report.ReportSettings().max_region_figures)  # overview + one each


def test_findings_have_one_number_everywhere_with_size_extent_change_and_score(out3d):
    out, _ = out3d
    page = _page(out)
    text = _text(page)
    doc = json.loads((out / "result.json").read_text())
    findings = [r for r in doc["regions"] if r["flagged"]]
    assert "PROGRESSION" in text and "NOT FOR DIAGNOSTIC USE" in text.upper()
    for r in findings:
        n = r["id"]
        assert f"id=\"finding-{n}\"" in page and f"href=\"#finding-{n}\"" in page  # table row, verdict list
        assert f"alt=\"finding {n}\"" in page and f"Finding {n}, slices through its centre" in text  # its figure
        size = f"{r['volume_mm3']:,.0f} mm³, {r['diameter_mm']:.1f} mm across, {abs(r['mean_change_pct']):.0f} % "
        assert f"Finding {n}: {size}" in text
        assert f"score {r['score']:.2f}, threshold {THRESHOLD:.2f}: " in text
        s = r["slices"]
        assert f"axial {s['axial']} · coronal {s['coronal']} · sagittal {s['sagittal']}" in text
    assert "brighter" in text  # the painted sphere is brighter at follow-up
    # plain column names, the raw field name in the tooltip
    assert '<th title="volume_mm3">changed tissue (mm³)</th>' in page and '<th title="diameter_mm">' in page
    for term in ("How to read this report", "The verdict", "The score", "The false-alarm setting",
                 "What it cannot see", "field of view both visits share", "one visit"):
        assert term.lower() in text.lower(), term


def test_dates_and_interval_are_shown_in_days_and_years(out3d):
    text = _text(_page(out3d[0]))
    assert "baseline 2020-01-02 → follow-up 2021-03-15 · 438 days (1.2 years) apart" in text


def test_modality_comes_from_the_pipeline_when_the_header_has_none(tmp_path):
    c = comparison_3d()
    blank = dataclasses.replace(c.baseline.meta, modality=None)
    pipe = dataclasses.replace(TEST_PIPELINE, modality="MR")
    c = dataclasses.replace(c, baseline=Image(c.baseline.itk, blank),
                            followup=Image(c.followup.itk, dataclasses.replace(c.followup.meta, modality=None)),
                            pipeline=pipe, regions=tuple(r for r in c.regions if not r.flagged)[:3])
    report.write_outputs(c, tmp_path)
    assert "MR (from pipeline test-absdiff; not in the files)" in _text(_page(tmp_path))


def test_header_text_is_escaped_on_the_page(tmp_path):
    c = comparison_3d()
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    m = dataclasses.replace(c.baseline.meta, patient_name=evil, series_description=evil)
    c = dataclasses.replace(c, baseline=Image(c.baseline.itk, m), regions=c.regions[:2])
    report.write_outputs(c, tmp_path)
    page = _page(tmp_path)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_threshold_is_stated_in_words_from_what_result_json_carries():
    from longitudinal.report.wording import threshold_sentence

    assert threshold_sentence({"false_findings_per_pair": 0.2, "false_alarm_rate": 3e-5}) == (
        "The threshold is set so that a stable pair (no real change) shows about 0.2 false findings on average.")
    old = threshold_sentence({"false_alarm_rate": 3e-5, "n_regions_scored": 20000})
    assert "1 in 33,333 unchanged regions" in old and "about 0.6 chance region(s) per pair" in old


def test_score_against_threshold_in_words():
    from longitudinal.report.wording import score_text

    assert score_text(4.60, 4.52) == "score 4.60, threshold 4.52: just above"
    assert score_text(5.6, 4.52).endswith(": above") and score_text(7.0, 4.52).endswith("far above")
    assert score_text(4.3, 4.52).endswith("just below") and score_text(None, 4.52).endswith("not scored")


def test_not_comparable_gets_its_own_colour_its_reason_and_no_findings(tmp_path):
    c = comparison_3d()
    reason = "registration failed its quality control (low similarity: NCC 0.35 < 0.7)"
    qc = dataclasses.replace(c.registration.qc, suspect=True, reasons=("low similarity: NCC 0.35 < 0.7",))
    nc = dataclasses.replace(c, registration=dataclasses.replace(c.registration, qc=qc), verdict="not comparable",
                             reason=reason, progression=False, progression_score=None, regions=(),
                             warnings=(f"Not comparable: {reason}.",))
    report.write_outputs(nc, tmp_path)
    page = _page(tmp_path)
    text = _text(page)
    assert 'class="verdict nc"' in page and "NOT COMPARABLE" in text
    assert f"These visits could not be compared: {reason}." in text and text.count(reason) == 1
    assert 'id="alignment"' in page and 'id="overview"' not in page and "Findings" not in text
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["verdict"] == "not comparable" and r["progression_score"] is None and r["reason"] == reason


def test_identical_inputs_say_so(tmp_path):
    c = comparison_3d()
    same = dataclasses.replace(c, identical=True, regions=(), progression=False, progression_score=0.0,
                               verdict="no progression", warnings=("The two inputs hold identical pixel data.",))
    report.write_outputs(same, tmp_path)
    page = _page(tmp_path)
    assert 'id="identical"' in page and "Inputs are identical." in _text(page)
    assert 'class="verdict neg"' in page and "identical pixel data" not in page  # said once, not twice


def test_suspect_registration_shows_a_warning_box(tmp_path, out3d):
    c = comparison_3d()
    assert not c.registration.qc.suspect and 'class="warn"' not in _page(out3d[0])
    qc = dataclasses.replace(c.registration.qc, suspect=True, reasons=("low overlap: foreground Dice 0.5 < 0.85",))
    bad = dataclasses.replace(c, registration=dataclasses.replace(c.registration, qc=qc))
    report.write_outputs(bad, tmp_path, report.OutputContext(settings=report.ReportSettings(max_region_figures=1)))
    page = _page(tmp_path)
    assert 'class="warn"' in page and "low overlap: foreground Dice 0.5" in page
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["registration"]["suspect"] is True and r["registration"]["reasons"]


def test_difference_panel_is_neutral_outside_the_compared_region():
    """Air and tissue only one visit imaged are grey, never the red/blue of a change (the old page blanked 0 of
    1.6 M voxels and drew air salmon)."""
    from longitudinal.report import figures as fg

    c = comparison_3d()
    d = fg.display(c, report.ReportSettings())
    outside = ~d.compared
    assert outside.sum() > 1000 and (d.body & ~d.compared).any()
    rgb = fg._diff_rgb(d.base.array, d.follow, d.compared, d.body, d.diff_limit)
    grey = np.all(np.isclose(rgb, fg.NOT_COMPARED), -1) | np.all(np.isclose(rgb, fg.AIR), -1)
    assert grey[outside].all()
    assert not grey[d.compared].any()  # inside, every voxel has a difference colour


def test_each_finding_crop_gets_a_window_that_keeps_tissue_texture():
    """The overview window tops out above the bright tissue; a crop's window is fitted to the crop."""
    from longitudinal.report import figures as fg

    c = comparison_3d()
    d = fg.display(c, report.ReportSettings())
    body = d.base.array[d.compared]
    assert np.mean(body >= d.window[1]) < 0.002
    assert d.window[1] > np.percentile(body, 99.5)  # the old window's top


def _all_output_bytes(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            out[str(f.relative_to(folder))] = gzip.decompress(data) if f.name.endswith(".gz") else data
    return out


def test_deidentify_leaves_no_patient_id_or_name_in_any_file(tmp_path):
    c = comparison_3d()
    report.write_outputs(c, tmp_path, report.OutputContext(deidentify=True, key=b"k" * 32))
    files = _all_output_bytes(tmp_path)
    assert set(files) >= EXPECTED_FILES
    for name, data in files.items():
        low = data.lower()
        for secret in (PATIENT_ID, PATIENT_NAME, "JANEWAY", "/data/", "1.2.826.0.1.3680043.2.1125.1.42"):
            assert secret.lower().encode() not in low, (secret, name)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["patient"]["deidentified"] is True and r["patient"]["name"] == report.HIDDEN
    assert r["patient"]["id"] == report.pseudonym(PATIENT_ID, b"k" * 32) != report.pseudonym(PATIENT_ID, b"x" * 32)
    assert r["visits"][0]["series_description"].startswith("T1 MPRAGE")  # description kept, name part scrubbed
    assert r["visits"][0]["study_date"] == "20200102"  # dates kept on purpose (documented)


def test_identifiers_in_image_metadata_do_not_reach_the_nifti_headers(tmp_path):
    """ITK writes ITK_FileNotes / aux_file into the NIfTI header: the report strips the metadata dictionary."""
    c = comparison_3d()
    leaky = sitk.Image(c.change_map.itk)
    leaky.SetMetaData("ITK_FileNotes", PATIENT_NAME)
    leaky.SetMetaData("aux_file", PATIENT_ID)
    report.write_outputs(dataclasses.replace(c, change_map=Image(leaky), regions=c.regions[:1]), tmp_path)
    header = gzip.decompress((tmp_path / "change_map.nii.gz").read_bytes())[:352]
    assert PATIENT_NAME.encode() not in header and PATIENT_ID.encode() not in header


def test_2d_rgb_outputs_are_single_slice_volumes_on_the_followups_grid(tmp_path):
    c = comparison_2d()
    paths = report.write_outputs(c, tmp_path)
    for key in ("change_map.nii.gz", "flagged_mask.nii.gz"):
        written = sitk.ReadImage(str(paths[key]))
        assert written.GetDimension() == 3 and written.GetSize()[2] == 1
        follow = c.followup.itk
        assert written.GetSize()[:2] == follow.GetSize()
        np.testing.assert_allclose(written.GetSpacing()[:2], follow.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(written.GetOrigin()[:2], follow.GetOrigin(), atol=1e-6)
        d = np.array(written.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(d[:2, :2].ravel(), follow.GetDirection(), atol=1e-9)
        assert nib.load(paths[key]).shape == (*follow.GetSize(), 1)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(paths["change_map.nii.gz"])))[0],
                               sitk.GetArrayFromImage(c.change_map.itk), atol=1e-5)
    reg = sitk.ReadImage(str(paths["registered.nii.gz"]))
    assert reg.GetNumberOfComponentsPerPixel() == 3 and reg.GetSize()[:2] == c.baseline.itk.GetSize()
    r = json.loads((tmp_path / "result.json").read_text())
    assert len(r["regions"][0]["centre_mm"]) == 2 and r["visits"][0]["rgb"] is True
    assert r["spatial_unit"] == "mm" and r["regions"][0]["slices"].keys() == {"x", "y"}
    text = _text(_page(tmp_path))
    assert "RGB" in text and "mm²" in text and "mm³" not in text  # real pixel spacing (0.06 mm): areas in mm²


def test_2d_pictures_without_pixel_size_are_measured_in_pixels(tmp_path):
    """A PNG carries no physical pixel size (SimpleITK gives spacing 1): sizes are px² and px, never mm."""
    c = comparison_2d()

    def unit_spacing(img: Image) -> Image:
        itk = sitk.Image(img.itk)
        itk.SetSpacing((1.0, 1.0))
        return img.with_itk(itk)

    png = dataclasses.replace(c, baseline=unit_spacing(c.baseline), regions=c.regions[:2])
    report.write_outputs(png, tmp_path)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["spatial_unit"] == "px"
    text = _text(_page(tmp_path))
    assert "px²" in text and "px across" in text and " mm" not in text.replace("mm³", "")


def test_display_orientation_is_radiological():
    """An axial slice is shown with anterior up and patient left on the right, whatever the storage order."""
    from longitudinal.report import figures as fg

    img = sitk.Image(8, 9, 5, sitk.sitkFloat32)
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # stored RAS, like the MNI file
    arr = np.zeros((5, 9, 8), np.float32)
    best, corner = None, None  # the voxel nearest patient-left-anterior (largest x in LPS, smallest y) of slice 2
    for j in range(9):
        for i in range(8):
            p = img.TransformIndexToPhysicalPoint((i, j, 2))
            if best is None or p[0] - p[1] > best:
                best, corner = p[0] - p[1], (i, j)
    arr[2, corner[1], corner[0]] = 1
    stored = sitk.GetImageFromArray(arr)
    stored.CopyInformation(img)
    view = fg.view(stored)
    assert fg._plane(view.array, "axial", 2)[0, -1] == 1  # top row (anterior), last column (patient left)
    assert fg._plane(view.array, "coronal", 0).shape == (5, 8)
    assert view.itk.TransformIndexToPhysicalPoint((0, 0, 4))[2] > view.itk.TransformIndexToPhysicalPoint((0, 0, 0))[2]
    assert fg.stored_slice(view, "sagittal", 0, stored) == 7  # the view's first column is the file's last


def test_jsonable_handles_numpy_and_non_finite():
    assert report.jsonable({"a": np.float32(1.5), "b": np.int64(3), "c": np.array([1, 2]), "d": (np.bool_(True),),
                            "e": float("nan"), 3: Path("x")}) == {"a": 1.5, "b": 3, "c": [1, 2], "d": [True], "e": None,
                                                                "3": "x"}
    assert math.isfinite(json.loads(json.dumps(report.jsonable(np.float64(2.0)))))


def test_a_pair_without_findings_reads_as_no_progression(tmp_path):
    c = comparison_3d()
    calm = dataclasses.replace(c, regions=tuple(r for r in c.regions if not r.flagged)[:5] + (
        dataclasses.replace(c.regions[-1], score=float("nan"), flagged=False, id=99),), progression=False,
        progression_score=1.2, verdict="no progression", finding_labels_baseline=None)
    report.write_outputs(calm, tmp_path)
    page = _page(tmp_path)
    text = _text(page)
    assert 'class="verdict neg"' in page and "NO PROGRESSION" in text and "No region is above the threshold" in text
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["progression"] is False and r["n_flagged"] == 0 and r["regions"][-1]["score"] is None  # NaN -> null
    assert len(list(csv.DictReader((tmp_path / "regions.csv").open()))) == 6


# --------------------------------------------------------------------------- writers and honest stamps


def _short_writes(monkeypatch, names: tuple[str, ...]):
    """A filesystem that silently keeps half of some files: the temp file is cut before it is renamed."""
    real = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name in names:
            data = Path(src).read_bytes()
            Path(src).write_bytes(data[: len(data) // 2])
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("name", ["report.html", "change_map.nii.gz", "result.json"])
def test_a_short_write_is_caught_and_the_folder_is_not_marked_complete(tmp_path, monkeypatch, name):
    c = dataclasses.replace(comparison_3d(), regions=comparison_3d().regions[:1])
    _short_writes(monkeypatch, (name,))
    with pytest.raises(report.OutputError, match=re.escape(name) + ".*does not read back"):
        report.write_outputs(c, tmp_path)
    assert not (tmp_path / report.COMPLETE).exists() and not report.is_complete(tmp_path)


def test_compare_on_a_full_disk_says_so_in_one_line_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    import errno

    import longitudinal.compare
    from longitudinal.cli import EXIT_CANNOT_WRITE, main

    base = tmp_path / "a.nii.gz"
    sitk.WriteImage(mni(6.0), str(base))
    monkeypatch.setattr(longitudinal.compare, "compare", lambda b, f, p, **kw: dataclasses.replace(
        make_comparison(b, f), regions=()))
    real = os.replace

    def full(src, dst, *a, **kw):
        if Path(dst).parent.name == "out":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full)
    assert main(["compare", str(base), str(base), "-o", str(tmp_path / "out")]) == EXIT_CANNOT_WRITE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longitudinal: error: ") and "No space left on device" in err[0]
    assert not (tmp_path / "out" / report.COMPLETE).exists()


def test_a_new_output_is_one_writer_and_its_files_are_checked_and_listed(tmp_path):
    from longitudinal.io import atomic_write_text

    c = dataclasses.replace(comparison_3d(), regions=comparison_3d().regions[:1])

    def notes(comparison, folder, context):
        who = context.pseudonym if context.deidentify else context.patient_id
        return [atomic_write_text(folder / "notes.json", json.dumps({"patient": who, "verdict": comparison.verdict}))]

    written = report.write_outputs(c, tmp_path, report.OutputContext(deidentify=True, key=b"k" * 32),
                                   writers={**report.WRITERS, "notes": notes})
    assert "notes.json" in written and "notes.json" in json.loads((tmp_path / report.COMPLETE).read_text())["files"]
    assert json.loads((tmp_path / "notes.json").read_text())["patient"] == report.pseudonym(PATIENT_ID, b"k" * 32)

    def broken(comparison, folder, context):
        return [atomic_write_text(folder / "bad.json", "{not json")]

    with pytest.raises(report.OutputError, match="bad.json"):
        report.write_outputs(c, tmp_path, writers={"bad": broken})
    assert not report.is_complete(tmp_path)


def test_the_series_used_and_loader_notes_are_shown_and_deidentified(tmp_path):
    c = comparison_3d()
    m = dataclasses.replace(c.followup.meta, series_choice=f"series 3 of 4 ({PATIENT_NAME} T1), the largest",
                            downsampled=f"downsampled from 0.5 mm (/data/{PATIENT_ID}/t1)")
    c = dataclasses.replace(c, followup=Image(c.followup.itk, m), regions=c.regions[:1])
    report.write_outputs(c, tmp_path / "plain")
    text = _text(_page(tmp_path / "plain"))
    assert "series used" in text and "series 3 of 4" in text and "downsampled from 0.5 mm" in text
    report.write_outputs(c, tmp_path / "deid", report.OutputContext(deidentify=True, key=b"k" * 32))
    r = json.loads((tmp_path / "deid" / "result.json").read_text())
    assert r["visits"][1]["series_choice"] == "series 3 of 4 ((hidden) T1), the largest"
    assert r["visits"][1]["notes"] == ["downsampled from 0.5 mm (/data/(hidden)/t1)"]
    assert PATIENT_ID not in _page(tmp_path / "deid") and "JANEWAY" not in _page(tmp_path / "deid")


def test_compare_of_a_pair_that_cannot_be_compared_exits_0_with_the_verdict_in_result_json(tmp_path, monkeypatch,
                                                                                            capsys):
    import longitudinal.compare
    from longitudinal.cli import EXIT_OK, main

    base = tmp_path / "a.nii.gz"
    sitk.WriteImage(mni(6.0), str(base))
    reason = "registration failed its quality control (low similarity: NCC 0.35 < 0.7)"

    def failed_registration(b, f, p, **kw):
        return dataclasses.replace(make_comparison(b, f), verdict="not comparable", reason=reason, regions=(),
                                   progression=False, progression_score=None)

    monkeypatch.setattr(longitudinal.compare, "compare", failed_registration)
    assert main(["compare", str(base), str(base), "-o", str(tmp_path / "out")]) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"NOT COMPARABLE: {reason}")
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    assert (r["verdict"], r["reason"], r["progression_score"]) == ("not comparable", reason, None)
    assert report.is_complete(tmp_path / "out")


def test_a_report_scored_by_a_trained_model_links_to_its_card(tmp_path):
    """A supervised verdict names its model and links to the card `longitudinal train` wrote beside it."""
    model = tmp_path / "models" / "svm.npz"
    model.parent.mkdir()
    model.write_bytes(b"not read by the report")
    card = model.with_name("svm.card.md")
    card.write_text("# card\n")
    c = comparison_3d()
    scoring = dataclasses.replace(TEST_PIPELINE.scoring, detector="svm", model=model)
    c = dataclasses.replace(c, pipeline=dataclasses.replace(TEST_PIPELINE, scoring=scoring), regions=c.regions[:3])
    report.write_outputs(c, tmp_path / "out")
    page = _page(tmp_path / "out")
    assert f'<a href="{card.resolve().as_uri()}">model card</a>' in page
    assert "supervised svm model trained with 'longitudinal train' (svm.npz)" in _text(page)
    card.unlink()
    report.write_outputs(c, tmp_path / "out2")
    assert "(svm.card.md), which is not beside the model file" in _text(_page(tmp_path / "out2"))
    report.write_outputs(comparison_3d(), tmp_path / "plain")
    assert 'id="detector"' not in _page(tmp_path / "plain")  # one-class: nothing trained elsewhere to point to
