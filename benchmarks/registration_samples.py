"""Registration QC of every sample pair, and its error against the known poses.

    python benchmarks/registration_samples.py [--sets easy hard dicom fundus] [--pipeline P]

For each follow-up against its baseline: the QC figures `compare` reports (Mattes MI, foreground Dice and NCC,
against identity; the suspect flag) and the target registration error over the baseline's foreground voxels,
measured in the patient's anatomy: |A_f(T(p)) - A_b(p)|, where A_v is the visit's `to_anatomy.tfm` ground truth
and T our fixed -> moving transform. No inverse is needed, so scanner distortion in A_f is handled exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from longitudinal.io import load_image
from longitudinal.pipeline import for_image, load
from longitudinal.masks import foreground_mask
from longitudinal.registration import register
from longitudinal.timeline import discover, pairs

ROOT = Path(__file__).resolve().parent.parent / "sample_studies"


def tre(baseline, transform, truth_b: Path, truth_f: Path, mask) -> tuple[float, float]:
    if not (truth_b.is_file() and truth_f.is_file()):
        return float("nan"), float("nan")
    a_b, a_f = sitk.ReadTransform(str(truth_b)), sitk.ReadTransform(str(truth_f))
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[::97][:, ::-1]  # (x, y[, z]) every 97th voxel
    ref = baseline.itk
    errors = []
    for i in idx:
        p = ref.TransformIndexToPhysicalPoint([int(v) for v in i])
        errors.append(np.linalg.norm(np.subtract(a_f.TransformPoint(transform.TransformPoint(p)), a_b.TransformPoint(p))))
    return float(np.mean(errors)), float(np.percentile(errors, 95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["easy", "hard", "dicom", "fundus"])
    ap.add_argument("--pipeline", default=None)
    args = ap.parse_args()
    header = f"{'set':7s} {'patient':8s} {'follow-up':11s} {'Dice':>6s} {'(id)':>6s} {'NCC':>6s} {'(id)':>6s} " \
             f"{'MI':>7s} {'(id)':>7s} {'TRE mm':>7s} {'p95':>6s} {'s':>5s}  suspect"
    print(header)
    for name in args.sets:
        root = ROOT / name
        for patient in discover(root):
            for pair in pairs(patient):
                b, f = load_image(pair.baseline.path), load_image(pair.followup.path)
                pipeline = load(args.pipeline) if args.pipeline else for_image(b)
                reg = register(b, f, pipeline.registration)
                q = reg.qc
                truth = root / "derivatives" / "changes" / patient.id
                mean, p95 = tre(b, reg.transform, truth / pair.baseline.id / "to_anatomy.tfm",
                                truth / pair.followup.id / "to_anatomy.tfm", foreground_mask(b, pipeline.masks))
                print(f"{name:7s} {patient.id:8s} {pair.followup.id:11s} {q.dice:6.3f} {q.identity_dice:6.3f} "
                      f"{q.ncc:6.3f} {q.identity_ncc:6.3f} {q.metric:7.4f} {q.identity_metric:7.4f} {mean:7.3f} "
                      f"{p95:6.3f} {q.seconds:5.1f}  {'; '.join(q.reasons) if q.suspect else 'no'}", flush=True)


if __name__ == "__main__":
    main()
