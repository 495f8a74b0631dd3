"""Speed and memory goals (issue #13): `compare` beside its own registration, ANTsPy and a plain subtraction pipeline.

    python benchmarks/compare.py [--skip-batch] [--skip-ants] [--sets easy hard] [--jobs 1 2]

Goals, on 2 cores: a 1 mm brain pair under 20 s wall and 1.2 GB peak RSS; a 1.5 mm sample pair (sample_studies/easy)
under 8 s; a 2D fundus pair (sample_studies/fundus) under 2 s; `longitudinal --help` under 1 s; batch --jobs 2
using at least 1.8 cores (CPU seconds / wall seconds). Every figure is printed, none is asserted.

The 1 mm pair is nilearn's MNI152 T1 (197x233x189): the follow-up is moved (3 degrees, 4 mm), rescaled in gain,
has its own noise and a new 6 mm lesion. On it, each in a fresh process (so its peak RSS, ru_maxrss of that child
and its workers, is the memory a user would see; wall and CPU are of that process, imports included):
  - our `compare` and its report;
  - our registration alone: `register` with the brain-mri pipeline's registration settings and the masks compare
    gives it (body masks and the template-fitted brain, made beforehand in another process and read from files);
  - ANTsPy `ants.registration(type_of_transform="Affine")` with its defaults, no masks (as benchmarks/registration.py);
  - a plain SimpleITK subtraction pipeline (rigid then affine Mattes MI, resample, histogram matching, absolute
    difference, one global threshold).
Registration accuracy is the target registration error of benchmarks/registration.py: the distance between the true
and the estimated follow-up position of every brain voxel (the known motion), in mm. Then the sample pairs (the
first follow-up pair `batch` finds in each set, by `longitudinal compare`), `longitudinal --help` (3 runs) and
`batch` over the sample studies. The machine's load average is printed: on a busy machine every wall time is
inflated.

ANTsPy is in the extra `bench`; without it (or with --skip-ants) the ANTs row is skipped with a printed line.
antspyx 0.6.3 declares numpy<2.4 and scipy<1.16, so a plain `pip install antspyx` downgrades both in the venv;
    pip install -c constraints.txt statsmodels patsy webcolors && pip install -c constraints.txt --no-deps antspyx
installs it beside the newer ones (its registration runs with numpy 2.4 and scipy 1.17).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LESION_MM = (-26.0, 20.0, 24.0)  # centre of the follow-up's new lesion, baseline physical space
# the follow-up's rigid move: Euler3DTransform(centre, angle_x, angle_y, angle_z (degrees), translation)
MOTION = ((0.0, -18.0, 18.0), (3.0, 0.0, -2.0), (4.0, -2.0, 1.0))
MNI = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"  # inside the nilearn package

PAIR_SCRIPT = r"""
import json, sys, time
from longitudinal.io import load_image
from longitudinal.compare import compare
from longitudinal.report import write_outputs
t = time.perf_counter()
c = compare(load_image(sys.argv[1]), load_image(sys.argv[2]))
t_compare = time.perf_counter() - t
write_outputs(c, sys.argv[3])
flagged = [r for r in c.regions if r.flagged]
distances = [sum((a - b) ** 2 for a, b in zip(r.centre_mm, LESION_MM)) ** 0.5 for r in flagged]
print(json.dumps({"compare_s": t_compare, "total_s": time.perf_counter() - t, "stages_s": c.timings_s,
                  "progression": c.progression, "flagged": len(flagged),
                  "lesion_found": any(d <= 6.0 for d in distances),
                  "other_findings": sum(d > 6.0 for d in distances)}))
""".replace("LESION_MM", repr(LESION_MM))

# The masks `prepare` gives `register` (body masks of both visits, the template-fitted brain as roi), written to
# files so that the registration process below does nothing else.
MASKS_SCRIPT = r"""
import json, sys
import SimpleITK as sitk
from longitudinal.io import load_image
from longitudinal.masks import brain_mask, foreground_mask
from longitudinal.pipeline import for_image
baseline, followup = load_image(sys.argv[1]), load_image(sys.argv[2])
pipeline = for_image(baseline)
brain = brain_mask(baseline.itk, pipeline.masks)
for name, mask in (("fixed_body", foreground_mask(baseline.itk, pipeline.masks)),
                   ("moving_body", foreground_mask(followup.itk, pipeline.masks)), ("roi", brain.mask)):
    sitk.WriteImage(mask, sys.argv[3] + "/" + name + ".mha", True)
print(json.dumps({"pipeline": pipeline.name, "brain_ml": brain.volume_ml, "brain_problem": brain.problem}))
"""

REGISTER_SCRIPT = r"""
import json, sys, time
import SimpleITK as sitk
from longitudinal.io import load_image
from longitudinal.pipeline import for_image
from longitudinal.registration import register
baseline, followup = load_image(sys.argv[1]), load_image(sys.argv[2])
masks = [sitk.ReadImage(sys.argv[3] + "/" + n + ".mha", sitk.sitkUInt8) for n in ("fixed_body", "moving_body", "roi")]
pipeline = for_image(baseline)
t, cpu = time.perf_counter(), time.process_time()
r = register(baseline, followup, pipeline.registration, *masks)
out = {"register_s": time.perf_counter() - t, "register_cpu_s": time.process_time() - cpu, "pipeline": pipeline.name,
       "threads": pipeline.registration.threads, "stages": list(r.qc.stages), "suspect": r.qc.suspect,
       "reasons": list(r.qc.reasons), "dice": r.qc.dice, "ncc": r.qc.ncc}
sitk.WriteTransform(r.transform, sys.argv[4])
print(json.dumps(out))
"""

ANTS_SCRIPT = r"""
import json, shutil, sys, time
try:
    import ants
except ImportError as exc:
    print(json.dumps({"skipped": f"import ants failed ({exc})"}))
    sys.exit(0)
fixed, moving = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
t, cpu = time.perf_counter(), time.process_time()
out = ants.registration(fixed, moving, type_of_transform="Affine", random_seed=1)
seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
shutil.move(out["fwdtransforms"][0], sys.argv[3])  # fixed -> moving points, as ours; not left in /tmp
print(json.dumps({"register_s": seconds, "register_cpu_s": cpu, "version": ants.__version__}))
"""

# A plain subtraction pipeline, SimpleITK only: what the detector is weighed against.
SUBTRACTION_SCRIPT = r"""
import json, sys, time
import numpy as np
import SimpleITK as sitk
fixed = sitk.ReadImage(sys.argv[1], sitk.sitkFloat32)
moving = sitk.ReadImage(sys.argv[2], sitk.sitkFloat32)
t = time.perf_counter()

def register(transform, shrink, sigmas):
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.01, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return transform

start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                         sitk.CenteredTransformInitializerFilter.MOMENTS)
rigid = register(start, [4, 2, 1], [2, 1, 0])
affine = sitk.AffineTransform(3)
affine.SetCenter(rigid.GetCenter())
affine.SetMatrix(rigid.GetMatrix())
affine.SetTranslation(rigid.GetTranslation())
affine = register(affine, [2, 1], [1, 0])
register_s = time.perf_counter() - t
resampled = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
matched = sitk.HistogramMatching(resampled, fixed, 256, 7, True)
difference = sitk.Abs(matched - fixed)
body = sitk.OtsuThreshold(fixed, 0, 1)
values = sitk.GetArrayViewFromImage(difference)[sitk.GetArrayViewFromImage(body) > 0]
threshold = float(values.mean() + 4 * values.std())  # the one global threshold
changed = sitk.And(difference > threshold, body)
sitk.WriteImage(difference, sys.argv[3] + "/difference.nii.gz", True)
sitk.WriteImage(changed, sys.argv[3] + "/changed.nii.gz", True)
shapes = sitk.LabelShapeStatisticsImageFilter()
shapes.Execute(sitk.ConnectedComponent(changed))
near = [bool(np.linalg.norm(np.subtract(shapes.GetCentroid(l), LESION_MM)) <= 6.0) for l in shapes.GetLabels()]
sitk.WriteTransform(affine, sys.argv[4])
print(json.dumps({"register_s": register_s, "total_s": time.perf_counter() - t, "threshold": threshold,
                  "voxels": int(sitk.GetArrayViewFromImage(changed).sum()), "components": len(near),
                  "lesion_found": any(near), "other_components": len(near) - sum(near)}))
""".replace("LESION_MM", repr(LESION_MM))


def motion():
    """The follow-up's rigid move (follow-up points -> baseline points; the true fixed -> moving map is its inverse)."""
    import numpy as np
    import SimpleITK as sitk

    centre, degrees, shift = MOTION
    return sitk.Euler3DTransform(centre, *np.deg2rad(degrees), shift)


def make_pair(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import SimpleITK as sitk
    import nilearn

    t1 = Path(nilearn.__file__).parent / MNI
    base = sitk.Cast(sitk.ReadImage(str(t1)), sitk.sitkFloat32)
    rng = np.random.default_rng(0)
    arr = sitk.GetArrayFromImage(base)
    # a 6 mm lesion, -40 % in white matter, then a rigid move of the whole head
    idx = np.indices(arr.shape).astype(np.float32)
    centre = base.TransformPhysicalPointToIndex(LESION_MM)[::-1]
    r2 = sum((idx[i] - centre[i]) ** 2 for i in range(3))
    lesion = np.exp(-r2 / (2 * 2.0 ** 2)).astype(np.float32)
    follow = sitk.GetImageFromArray(arr * (1 - 0.4 * lesion))
    follow.CopyInformation(base)
    follow = sitk.Resample(follow, base, motion(), sitk.sitkLinear, 0.0) * 1.1
    paths = []
    for name, img in (("baseline", base), ("followup", follow)):
        a = sitk.GetArrayFromImage(img)
        noisy = sitk.GetImageFromArray((a + rng.normal(0, 0.01 * a.max(), a.shape)).clip(0).astype(np.float32))
        noisy.CopyInformation(base)
        paths.append(folder / f"{name}.nii.gz")
        sitk.WriteImage(noisy, str(paths[-1]), True)
    return paths[0], paths[1]


# Runs a command and prints its wall and CPU time and the largest peak RSS of it and its workers (the wrapper's own
# start-up is not counted): getrusage(RUSAGE_CHILDREN) in the benchmark itself would keep the maximum of every
# earlier child too.
MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
out = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
sys.stdout.write(out.stdout)
sys.stderr.write(out.stderr[-3000:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}))
sys.exit(out.returncode)
"""


def run_child(args: list[str]) -> tuple[float, float, float, str]:
    """(wall s, CPU s of the command and its workers, peak RSS MB of its largest process, its stdout)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(args[:2])}...\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    m = json.loads(lines[-1])
    return m["wall_s"], m["cpu_s"], m["peak_rss_mb"], "\n".join(lines[:-1])


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def cli() -> list[str]:
    """The `longitudinal` console script next to this Python (what a user runs), else `python -m longitudinal.cli`."""
    script = Path(sys.executable).with_name("longitudinal")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "longitudinal.cli"]


def tre_mm(transform_file: Path) -> tuple[float, float]:
    """(mean, 95th percentile) target registration error of a fixed -> moving transform over the brain voxels, mm,
    as benchmarks/registration.py measures it."""
    import SimpleITK as sitk
    import nilearn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    saved = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    from registration import brain_points, map_points, tre  # sets that variable for ANTs; put back below

    if saved is None:
        os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
    else:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = saved
    pts = brain_points(sitk.ReadImage(str(Path(nilearn.__file__).parent / MNI)))
    return tre(map_points(sitk.ReadTransform(str(transform_file)), pts), map_points(motion().GetInverse(), pts))


def row(name: str, wall: float, cpu: float, rss: float, note: str = "") -> None:
    print(f"  {name:44s} {wall:7.1f} {cpu:7.1f} {rss:8.0f}   {note}")


def sample_pair(set_name: str) -> tuple[Path, Path, str]:
    """The first follow-up pair `batch` finds in a sample set: (baseline, follow-up, a name for it)."""
    from longitudinal.timeline import discover, pairs

    for patient in discover(ROOT / "sample_studies" / set_name):
        for pair in pairs(patient):
            name = f"{patient.id} {pair.baseline.id} -> {pair.followup.id}"
            return Path(pair.baseline.path), Path(pair.followup.path), name
    raise SystemExit(f"no pair in sample_studies/{set_name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--skip-ants", action="store_true", help="leave out the ANTsPy registration")
    ap.add_argument("--sets", nargs="+", default=["easy", "hard", "dicom", "fundus"])
    ap.add_argument("--jobs", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline, followup = make_pair(tmp)
        pair = [str(baseline), str(followup)]
        print("\n1 mm brain pair (197x233x189), each in a fresh process     wall s   CPU s  peak MB")

        wall, cpu, rss, out = run_child([sys.executable, "-c", PAIR_SCRIPT, *pair, str(tmp / "out")])
        result = last_json(out)
        ours = (wall, rss)
        row("ours: compare + report", wall, cpu, rss, f"(goals: 20 s, 1.2 GB) compare call {result['compare_s']:.1f} s")
        print("      stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["stages_s"].items()))
        print(f"      verdict: progression={result['progression']}, {result['flagged']} flagged findings; the new 6 mm "
              f"lesion {'found' if result['lesion_found'] else 'MISSED'}, {result['other_findings']} other findings")

        _, _, _, out = run_child([sys.executable, "-c", MASKS_SCRIPT, *pair, str(tmp)])
        masks = last_json(out)
        wall, cpu, rss, out = run_child([sys.executable, "-c", REGISTER_SCRIPT, *pair, str(tmp),
                                         str(tmp / "ours.tfm")])
        reg = last_json(out)
        registrations = {"ours": (wall, rss, reg["register_s"], tmp / "ours.tfm")}
        row(f"ours: registration alone ({reg['pipeline']})", wall, cpu, rss,
            f"register call {reg['register_s']:.1f} s wall, {reg['register_cpu_s']:.1f} s CPU")
        print(f"      {'+'.join(reg['stages'])}, {reg['threads']} ITK thread(s), masks as compare gives them (brain "
              f"{masks['brain_ml']:.0f} ml{', ' + masks['brain_problem'] if masks['brain_problem'] else ''}; made "
              f"beforehand, not counted); QC Dice {reg['dice']:.3f}, NCC {reg['ncc']:.3f}"
              + (f", SUSPECT: {'; '.join(reg['reasons'])}" if reg["suspect"] else ""))

        if args.skip_ants:
            print("  ANTsPy Affine: skipped (--skip-ants)")
        else:
            wall, cpu, rss, out = run_child([sys.executable, "-c", ANTS_SCRIPT, *pair, str(tmp / "ants.mat")])
            ants = last_json(out)
            if "skipped" in ants:
                print(f"  ANTsPy Affine: skipped, {ants['skipped']}; pip install antspyx (see the docstring)")
            else:
                registrations["ANTsPy"] = (wall, rss, ants["register_s"], tmp / "ants.mat")
                row(f"ANTsPy {ants['version']} Affine registration", wall, cpu, rss,
                    f"ants.registration call {ants['register_s']:.1f} s wall, {ants['register_cpu_s']:.1f} s CPU")
                print(f"      defaults, no masks, ITK threads "
                      f"{os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', 'default (all cores)')}")

        (tmp / "subtraction").mkdir()
        wall, cpu, rss, out = run_child([sys.executable, "-c", SUBTRACTION_SCRIPT, *pair, str(tmp / "subtraction"),
                                         str(tmp / "subtraction.tfm")])
        sub = last_json(out)
        subtraction = (wall, rss)
        registrations["subtraction"] = (wall, rss, sub["register_s"], tmp / "subtraction.tfm")
        row("plain SimpleITK subtraction pipeline", wall, cpu, rss,
            f"its registration {sub['register_s']:.1f} s, all after reading {sub['total_s']:.1f} s")
        print(f"      |difference| > {sub['threshold']:.1f} (mean + 4 SD in the Otsu body): {sub['voxels']} voxels in "
              f"{sub['components']} components; the new 6 mm lesion {'found' if sub['lesion_found'] else 'MISSED'}, "
              f"{sub['other_components']} other components")

        print("\nregistration accuracy (TRE vs the known motion, all brain voxels, as benchmarks/registration.py):")
        for name, (_, _, _, path) in registrations.items():
            mean, p95 = tre_mm(path)
            print(f"  {name:12s} mean {mean:.3f} mm, p95 {p95:.3f} mm")

        print("\nratios (process wall time and peak RSS, each in its own process):")
        print(f"  ours compare / subtraction pipeline:  wall {ours[0] / subtraction[0]:.2f}, "
              f"peak RSS {ours[1] / subtraction[1]:.2f}")
        if "ANTsPy" in registrations:
            o, a = registrations["ours"], registrations["ANTsPy"]
            print(f"  ours registration / ANTsPy Affine:   wall {o[0] / a[0]:.2f} (registration call alone "
                  f"{o[2] / a[2]:.2f}), peak RSS {o[1] / a[1]:.2f}")
        else:
            print("  ours registration / ANTsPy Affine:   - (ANTs skipped)")

        print("\nsample pairs and start-up, each in a fresh process (`longitudinal compare`, report included):")
        for set_name, goal in (("easy", "goal 8 s"), ("fundus", "goal 2 s")):
            b, f, name = sample_pair(set_name)
            out_dir = tmp / f"sample-{set_name}"
            wall, cpu, rss, _ = run_child([*cli(), "compare", str(b), str(f), "-o", str(out_dir)])
            doc = json.loads((out_dir / "result.json").read_text())
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in (doc.get("timings_s") or {}).items()
                               if isinstance(v, (int, float)))
            print(f"  {set_name} {name}: wall {wall:.1f} s ({goal}), CPU {cpu:.1f} s, peak RSS {rss:.0f} MB; {stages}")
        helps = [run_child([*cli(), "--help"])[:3] for _ in range(3)]
        walls = [h[0] for h in helps]
        print(f"  {' '.join(Path(c).name for c in cli())} --help: wall {statistics.median(walls):.2f} s median of "
              f"{', '.join(f'{w:.2f}' for w in walls)} (goal 1 s), CPU {statistics.median(h[1] for h in helps):.2f} s, "
              f"peak RSS {max(h[2] for h in helps):.0f} MB")
        print(f"load average now {os.getloadavg()[0]:.2f}")
        if args.skip_batch:
            return
        print("\nbatch over sample_studies/ (" + ", ".join(args.sets) + "):")
        for jobs in args.jobs:
            out_dir = tmp / f"batch{jobs}"
            walls, cpus, rsss = 0.0, 0.0, 0.0
            for s in args.sets:
                w, c, r, _ = run_child([sys.executable, "-m", "longitudinal.cli", "batch", str(ROOT / "sample_studies" / s),
                                        "-o", str(out_dir / s), "--jobs", str(jobs), "--no-progress"])
                walls, cpus, rsss = walls + w, cpus + c, max(rsss, r)
            pairs = sum(1 for _ in out_dir.rglob("result.json"))
            goal = " (goal for --jobs 2: >= 1.8)" if jobs == 2 else ""
            print(f"  --jobs {jobs}: {pairs} pairs in {walls:.1f} s wall, {cpus:.1f} CPU s "
                  f"(cores used {cpus / walls:.2f}{goal}), peak RSS of the largest process {rsss:.0f} MB")
            shutil.rmtree(out_dir)
        print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
