"""The screenshots in docs/: a batch over sample studies rendered in headless Chromium.

    python docs/screenshots.py [--out docs] [--jobs 2]

Pairs: easy/sub-04 (progression: a new lesion and atrophy), hard/P002 (stable), fundus/F001 (a photograph), and
hard/P005's baseline against its follow-up flipped front to back (a registration that fails: not comparable).
Needs Chromium.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import Chromium  # noqa: E402

from longitudinal.batch import run_batch  # noqa: E402

SAMPLES = ROOT / "sample_studies"
SHOTS = {  # file -> (pair folder or "summary", top element id or None, height in pixels)
    "summary.png": ("summary", None, 1100),
    "report-progression.png": ("E004/2021-06-28", None, 2300),
    "report-finding.png": ("E004/2021-06-28", "findings-table", 1750),
    "report-stable.png": ("P002/2021-04-19", None, 1900),
    "report-not-comparable.png": ("P006/2022-03-02", None, 1750),
    "report-fundus.png": ("F001/2020-08-05", None, 3000),
}


def studies(root: Path) -> Path:
    for patient in ("hard/P002", "fundus/F001"):
        shutil.copytree(SAMPLES / patient, root / Path(patient).name)
    for session, date in (("ses-01", "2020-06-22"), ("ses-02", "2021-06-28")):  # easy/sub-04 in the plain layout
        (root / "E004" / date).mkdir(parents=True)
        shutil.copy(SAMPLES / f"easy/sub-04/{session}/anat/sub-04_{session}_T1w.nii.gz", root / "E004" / date / "t1.nii.gz")
    (root / "P006" / "2021-09-01").mkdir(parents=True)
    shutil.copy(SAMPLES / "hard/P005/2021-09-01/t1.nii.gz", root / "P006" / "2021-09-01" / "t1.nii.gz")
    follow = sitk.ReadImage(str(SAMPLES / "hard/P005/2022-03-02/t1.nii.gz"))
    flipped = sitk.Flip(follow, [False, True, False])
    flipped.CopyInformation(follow)
    (root / "P006" / "2022-03-02").mkdir(parents=True)
    sitk.WriteImage(flipped, str(root / "P006" / "2022-03-02" / "t1.nii.gz"), True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    executable = Chromium.find()
    if executable is None:
        sys.exit("no Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        summary = run_batch(studies(Path(tmp) / "studies"), out, pipeline=None, jobs=args.jobs, progress=False)
        print(f"{len(summary.results)} pairs: " + ", ".join(f"{r.patient} {r.verdict or r.error}" for r in summary.results))
        with Chromium(executable) as browser:
            for name, (page, anchor, height) in SHOTS.items():
                browser.open(out / ("summary.html" if page == "summary" else f"{page}/report.html"))
                if browser.errors():
                    sys.exit(f"{page}: {browser.errors()}")
                top = 0 if anchor is None else browser.evaluate(
                    f"document.getElementById('{anchor}').getBoundingClientRect().top + window.scrollY - 40")
                browser.screenshot(args.out / name, top=top, height=height)
                print(f"{args.out / name}")


if __name__ == "__main__":
    main()
