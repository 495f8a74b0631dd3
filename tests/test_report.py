"""The report stage's output contract, on Comparisons built from real scans (nilearn's MNI152, scikit-image's retina).

`make_comparison` is test scaffolding standing in for `compare.compare` (not written yet): it runs the real
registration and harmonisation, then scores grid regions by the robust z of |follow-up - baseline|, which
is honest about what changed (a lesion the test painted into the follow-up) without the encoder.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import math
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

TEST_PIPELINE = Pipeline(name="test-absdiff", version="0.1", description="test scaffolding", modality="",
                         source="tests/test_report.py", stages={})


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
    zz, yy, xx = np.indices(arr.shape[:3])
    idx = itk.TransformPhysicalPointToContinuousIndex(centre_mm)
    sp = itk.GetSpacing()
    d2 = ((xx - idx[0]) * sp[0]) ** 2 + ((yy - idx[1]) * sp[1]) ** 2
    if arr.ndim >= 3 and itk.GetDimension() == 3:
        d2 = d2 + ((zz - idx[2]) * sp[2]) ** 2
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
    """Scaffolding for compare(): real registration + harmonisation, |difference| as the change map."""
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
    inside = sitk.GetArrayFromImage(mask) > 0
    diff = np.abs(sitk.GetArrayFromImage(luminance(f_h.itk)) - sitk.GetArrayFromImage(luminance(b_h.itk)))
    med = float(np.median(diff[inside]))
    mad = 1.4826 * float(np.median(np.abs(diff[inside] - med))) or 1.0
    z = np.where(inside, (diff - med) / mad, 0).astype(np.float32)
    z_img = sitk.GetImageFromArray(z)
    z_img.CopyInformation(luminance(baseline.itk))
    regions_out, flagged_base = [], np.zeros(z.shape, np.uint8)
    ref = luminance(baseline.itk)
    spacing = baseline.spacing
    grid = RegionSettings(size_mm=10 * spacing[0]) if baseline.dim == 2 else RegionSettings(size_mm=15.0, overlap=0.2)
    for r in grid_regions(ref, inside, grid):
        member = r.members(inside)
        values = z[r.slices()][member]
        score = float(np.mean(values)) if values.size else 0.0
        flagged = score > THRESHOLD
        if flagged:
            flagged_base[r.slices()][member] = 1
        regions_out.append(ScoredRegion(id=r.id, label=r.label, centre_mm=r.centre_mm, bbox=r.bbox,
                                        volume_mm3=r.volume_mm3, score=score, flagged=flagged,
                                        stats={"absdiff_z_mean": score, "absdiff_z_max": float(values.max(initial=0))}))
    fb = sitk.GetImageFromArray(flagged_base)
    fb.CopyInformation(ref)
    change_map = reg.to_moving(z_img, luminance(followup.itk))
    flagged_mask = sitk.Cast(reg.to_moving(fb, luminance(followup.itk), sitk.sitkNearestNeighbor), sitk.sitkUInt8)
    best = max((r.score for r in regions_out), default=0.0)
    return Comparison(
        baseline=baseline, followup=followup, registered=reg.registered, baseline_harmonised=b_h,
        followup_harmonised=f_h, change_map_baseline=Image(z_img), change_map=Image(change_map),
        flagged_mask=Image(flagged_mask), regions=tuple(regions_out), progression_score=best,
        progression=best > THRESHOLD, threshold=THRESHOLD, false_alarm_rate=float(norm.sf(THRESHOLD)),
        registration=reg, pipeline=pipeline,
        encoder={"name": "absdiff (test)", "weights": "", "sha256": "0" * 64},
        timings_s={"registration": t1 - t0, "preprocessing": t2 - t1, "scoring": time.perf_counter() - t2},
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


def test_every_output_file_is_written_and_the_folder_is_marked_complete(out3d):
    out, paths = out3d
    assert set(paths) == set(report.OUTPUT_FILES)
    for key, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, key
    assert report.is_complete(out)
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".tmp-*"))  # no temp files left behind


def test_result_json_contract(out3d):
    out, _ = out3d
    c = comparison_3d()
    r = json.loads((out / "result.json").read_text())
    assert isinstance(r["progression_score"], float) and isinstance(r["progression"], bool)
    assert r["progression_score"] == pytest.approx(c.progression_score)
    assert r["threshold"] == THRESHOLD and 0 < r["false_alarm_rate"] < 1
    assert len(r["regions"]) == len(c.regions) > 0
    for reg in r["regions"]:
        assert set(reg) == {"id", "label", "centre_mm", "bbox", "volume_mm3", "score", "flagged", "stats", "diameter_mm",
                        "mean_change_pct", "n_voxels", "centre_index"}
        assert len(reg["centre_mm"]) == 3 and len(reg["bbox"]) == 2 and isinstance(reg["flagged"], bool)
    # flagged first, then by score
    keys = [(not g["flagged"], -g["score"]) for g in r["regions"]]
    assert keys == sorted(keys)
    assert r["registration"]["transform_file"] == "transform.tfm"
    assert isinstance(r["registration"]["suspect"], bool) and 0 < r["registration"]["dice"] <= 1
    assert r["pipeline"]["name"] == "test-absdiff" and r["pipeline"]["version"] == "0.1"
    assert r["encoder"]["sha256"] == "0" * 64
    assert r["longitudinal_version"]
    assert set(r["timings_s"]) >= {"registration", "report"} and all(v >= 0 for v in r["timings_s"].values())
    assert "volume_mm3" in r["units"] and "centre_mm" in r["units"]
    assert r["patient"]["id"] == PATIENT_ID and [v["study_date"] for v in r["visits"]] == ["20200102", "20210315"]


def test_the_painted_lesion_is_what_gets_flagged(out3d):
    """Not a test of the scorer: a check that the report carries the comparison's regions through faithfully."""
    out, _ = out3d
    r = json.loads((out / "result.json").read_text())
    assert r["progression"] is True
    top = r["regions"][0]
    assert top["flagged"]
    assert np.linalg.norm(np.array(top["centre_mm"]) - np.array([20.0, -10.0, 20.0])) < 15.0


def test_regions_csv_matches_result_json(out3d):
    out, _ = out3d
    rows = list(csv.DictReader((out / "regions.csv").open()))
    r = json.loads((out / "result.json").read_text())
    assert [int(row["id"]) for row in rows] == [g["id"] for g in r["regions"]]
    assert {"id", "label", "centre_x_mm", "centre_y_mm", "centre_z_mm", "volume_mm3", "score", "flagged"} <= set(rows[0])
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
    registered = sitk.ReadImage(str(out / "registered.nii.gz"))
    _assert_same_grid(registered, c.baseline.itk)
    # nibabel (another reader, RAS convention) agrees on where voxel 0 is
    aff = nib.load(out / "change_map.nii.gz").affine
    o = c.followup.itk.GetOrigin()
    np.testing.assert_allclose(aff[:3, 3], [-o[0], -o[1], o[2]], atol=1e-3)


def test_transform_file_reads_back_and_maps_like_the_registration(out3d):
    out, _ = out3d
    c = comparison_3d()
    tx = sitk.ReadTransform(str(out / "transform.tfm"))
    for p in [(0.0, 0.0, 0.0), (30.0, -20.0, 10.0)]:
        np.testing.assert_allclose(tx.TransformPoint(p), c.registration.transform.TransformPoint(p), atol=1e-4)


def test_html_is_self_contained_and_shows_the_verdict(out3d):
    out, _ = out3d
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    srcs = re.findall(r"""src\s*=\s*['"]([^'"]*)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "PROGRESSION" in page and "false-alarm rate" in page
    c = comparison_3d()
    n_flagged = sum(r.flagged for r in c.regions)
    # one figure per flagged place, plus the overview
    assert 2 <= len(srcs) <= 1 + min(n_flagged, report.ReportSettings().max_region_figures)
    table = page[page.index("<table class='regions'>"):]
    table = table[: table.index("</table>")]
    assert table.count("<tr") - 1 == min(len(c.regions), report.ReportSettings().max_table_rows)
    if len(c.regions) > report.ReportSettings().max_table_rows:
        assert f"Showing {report.ReportSettings().max_table_rows} of {len(c.regions)} regions" in page
    for s in srcs:  # every embedded picture is a real PNG
        import base64

        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_suspect_registration_shows_a_warning_box(tmp_path, out3d):
    import dataclasses

    c = comparison_3d()
    assert not c.registration.qc.suspect
    assert "class='warn'" not in (out3d[0] / "report.html").read_text()
    qc = dataclasses.replace(c.registration.qc, suspect=True, reasons=("low overlap: foreground Dice 0.5 < 0.85",))
    bad = dataclasses.replace(c, registration=dataclasses.replace(c.registration, qc=qc))
    report.write_outputs(bad, tmp_path, settings=report.ReportSettings(max_region_figures=1))
    page = (tmp_path / "report.html").read_text()
    assert "class='warn'" in page and "low overlap: foreground Dice 0.5" in page
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["registration"]["suspect"] is True and r["registration"]["reasons"]


def _all_output_bytes(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            out[str(f.relative_to(folder))] = gzip.decompress(data) if f.name.endswith(".gz") else data
    return out


def test_deidentify_leaves_no_patient_id_or_name_in_any_file(tmp_path):
    c = comparison_3d()
    report.write_outputs(c, tmp_path, deidentify=True, deid_key=b"k" * 32)
    files = _all_output_bytes(tmp_path)
    assert len(files) >= len(report.OUTPUT_FILES)
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
    import dataclasses

    c = comparison_3d()
    leaky = sitk.Image(c.change_map.itk)
    leaky.SetMetaData("ITK_FileNotes", PATIENT_NAME)
    leaky.SetMetaData("aux_file", PATIENT_ID)
    report.write_outputs(dataclasses.replace(c, change_map=Image(leaky)), tmp_path,
                         settings=report.ReportSettings(max_region_figures=1))
    header = gzip.decompress((tmp_path / "change_map.nii.gz").read_bytes())[:352]
    assert PATIENT_NAME.encode() not in header and PATIENT_ID.encode() not in header


def test_2d_rgb_outputs_are_single_slice_volumes_on_the_followups_grid(tmp_path):
    c = comparison_2d()
    paths = report.write_outputs(c, tmp_path)
    for key in ("change_map", "flagged_mask"):
        written = sitk.ReadImage(str(paths[key]))
        assert written.GetDimension() == 3 and written.GetSize()[2] == 1
        follow = c.followup.itk
        assert written.GetSize()[:2] == follow.GetSize()
        np.testing.assert_allclose(written.GetSpacing()[:2], follow.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(written.GetOrigin()[:2], follow.GetOrigin(), atol=1e-6)
        d = np.array(written.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(d[:2, :2].ravel(), follow.GetDirection(), atol=1e-9)
        assert nib.load(paths[key]).shape == (*follow.GetSize(), 1)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(paths["change_map"])))[0],
                               sitk.GetArrayFromImage(c.change_map.itk), atol=1e-5)
    reg = sitk.ReadImage(str(paths["registered"]))
    assert reg.GetNumberOfComponentsPerPixel() == 3 and reg.GetSize()[:2] == c.baseline.itk.GetSize()
    r = json.loads((tmp_path / "result.json").read_text())
    assert len(r["regions"][0]["centre_mm"]) == 2 and r["visits"][0]["rgb"] is True
    page = (tmp_path / "report.html").read_text()
    assert "RGB" in page and page.count("data:image/png;base64,") >= 1


def test_display_orientation_is_radiological():
    """An axial slice is shown with anterior up and patient left on the right, whatever the storage order."""
    img = sitk.Image(8, 9, 5, sitk.sitkFloat32)
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # stored RAS, like the MNI file
    arr = np.zeros((5, 9, 8), np.float32)
    # mark the voxel nearest patient-left-anterior (largest x in LPS, smallest y) of slice 2
    corner_lps = None
    best = None
    for j in range(9):
        for i in range(8):
            p = img.TransformIndexToPhysicalPoint((i, j, 2))
            score = p[0] - p[1]
            if best is None or score > best:
                best, corner_lps = score, (i, j)
    arr[2, corner_lps[1], corner_lps[0]] = 1
    stored = sitk.GetImageFromArray(arr)
    stored.CopyInformation(img)
    view = report._view(stored)
    shown = report._plane(view.array, "axial", 2)
    assert shown[0, -1] == 1  # top row (anterior), last column (patient left)
    cor = report._plane(view.array, "coronal", 0)
    assert cor.shape == (5, 8)
    assert view.itk.TransformIndexToPhysicalPoint((0, 0, 4))[2] > view.itk.TransformIndexToPhysicalPoint((0, 0, 0))[2]


def test_jsonable_handles_numpy_and_non_finite():
    assert report.jsonable({"a": np.float32(1.5), "b": np.int64(3), "c": np.array([1, 2]), "d": (np.bool_(True),),
                            "e": float("nan"), 3: Path("x")}) == {"a": 1.5, "b": 3, "c": [1, 2], "d": [True], "e": None,
                                                                "3": "x"}
    assert math.isfinite(json.loads(json.dumps(report.jsonable(np.float64(2.0)))))


def test_a_pair_without_flagged_regions_reads_as_no_progression(tmp_path):
    import dataclasses

    c = comparison_3d()
    calm = dataclasses.replace(c, regions=tuple(dataclasses.replace(r, flagged=False) for r in c.regions[:5]) + (
        dataclasses.replace(c.regions[5], score=float("nan"), flagged=False),), progression=False, progression_score=1.2)
    report.write_outputs(calm, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "NO PROGRESSION" in page and "No region is above the threshold" in page
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["progression"] is False and r["n_flagged"] == 0 and r["regions"][-1]["score"] is None  # NaN -> null
    assert len(list(csv.DictReader((tmp_path / "regions.csv").open()))) == 6
