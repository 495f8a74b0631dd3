"""SimpleITK registration methods made one way, for every stage that registers: `registration` (the visits)
and `masks` (the brain template's fit). It sits below both, so neither imports the other for it.

The thread count is what makes a fit repeatable: the metric's sums change order with the number of threads, and
with them the result (a brain mask fitted with all of a process's threads differed from run to run).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def registration_method(threads: int) -> sitk.ImageRegistrationMethod:
    """An ImageRegistrationMethod whose metric and optimiser use `threads` ITK threads. Only they: the pyramid's
    Gaussian smoothing, most of a level's time, is made by filters on the process's default count."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(threads)
    reg.SetNumberOfWorkUnits(threads)  # the metric's threader splits by work units: both, or it runs in parallel
    return reg


def set_metric_sampling(reg: sitk.ImageRegistrationMethod, fixed_mask: sitk.Image | None, shrink, fraction: float,
                        min_samples: int, seed: int) -> None:
    """Random sampling with about the same sample count at every level: coarse levels have fewer voxels, so they
    sample a larger fraction. The count comes from the (full-resolution) mask or image."""
    dim = fixed_mask.GetDimension() if fixed_mask is not None else 3
    n_voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask))) if fixed_mask is not None else 1
    samples = max(fraction * n_voxels, min_samples)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(
        [float(min(1.0, samples / max(1.0, n_voxels / f**dim))) for f in shrink], seed)
