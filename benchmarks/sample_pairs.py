"""The sample studies' follow-ups with their truth, prepared as `compare` prepares them (shared by benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from longitudinal.compare import Prepared, prepare
from longitudinal.evaluation import read_truth
from longitudinal.io import load_image
from longitudinal.pipeline import for_image, load
from longitudinal.timeline import discover, pairs

ROOT = Path(__file__).resolve().parent.parent / "sample_studies"


def prepared_pairs(set_name: str, pipeline_name: str | None = None
                   ) -> Iterator[tuple[str, str, Prepared, np.ndarray, dict]]:
    """(patient, follow-up, prepared pair, truth mask on the baseline grid, changes.json) of every follow-up."""
    root = ROOT / set_name
    for patient in discover(root):
        for pair in pairs(patient):
            truth_itk, doc = read_truth(root, patient.id, pair.followup.id)
            baseline, followup = load_image(pair.baseline.path), load_image(pair.followup.path)
            pipeline = load(pipeline_name) if pipeline_name else for_image(baseline)
            prepared = prepare(baseline, followup, pipeline)
            truth_b = prepared.registration.to_fixed(sitk.Cast(truth_itk, sitk.sitkFloat32))
            yield patient.id, pair.followup.id, prepared, sitk.GetArrayFromImage(truth_b) > 0.5, doc
