"""Registration of 2D photographs with and without flat-fielding: how many pairs end with their vessels aligned.

    python benchmarks/flatten.py /work/cohorts/dev/fundus --flatten 0 30 50 80 120

For each follow-up of each patient (registered to the first visit with the generic-2d pipeline's settings and
`registration.flatten_mm` set to each value), the normalised cross-correlation of the two visits' fine structure
(luminance less its 8-pixel Gaussian: vessels, not illumination) inside the baseline's foreground after
registration, and whether registration QC passed. Choose the setting on a dev split; report it on validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from longitudinal.masks import foreground_mask, luminance, mask_array
from longitudinal.pipeline import load
from longitudinal.registration import register
from longitudinal.timeline import discover, pairs


def fine_ncc(a: np.ndarray, b: np.ndarray, inside: np.ndarray) -> float:
    a = (a - ndimage.gaussian_filter(a, 8))[inside]
    b = (b - ndimage.gaussian_filter(b, 8))[inside]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", type=Path)
    ap.add_argument("--flatten", type=float, nargs="+", default=[0.0, 30.0, 50.0, 80.0, 120.0])
    ap.add_argument("--pipeline", default="generic-2d")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    pipeline = load(args.pipeline)
    todo = [pair for patient in discover(args.studies) for pair in pairs(patient)]
    print(f"{args.studies}: {len(todo)} pairs, pipeline {pipeline.name} {pipeline.version}")
    print("flatten_mm | fine-structure NCC median | min | pairs < 0.9 | QC passed")
    for sigma in args.flatten:
        settings = dataclasses.replace(pipeline.registration, flatten_mm=sigma)
        nccs, passed = [], 0
        for pair in todo:
            baseline, followup = pair.baseline.load(), pair.followup.load()
            reg = register(baseline, followup, settings)
            fixed = sitk.GetArrayFromImage(luminance(baseline.itk)).astype(np.float64)
            moved = sitk.GetArrayFromImage(luminance(reg.registered.itk)).astype(np.float64)
            inside = mask_array(foreground_mask(baseline.itk)) & (moved > 0)
            nccs.append(fine_ncc(fixed, moved, inside))
            passed += not reg.qc.suspect
        x = np.array(nccs)
        print(f"{sigma:g} | {np.median(x):.3f} | {x.min():.3f} | {(x < 0.9).sum()} | {passed}/{len(x)}")


if __name__ == "__main__":
    main()
