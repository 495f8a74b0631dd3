"""Lesion tracking accuracy on studies with known lesion identities (ground truth `id`s stable across visits).

    python benchmarks/tracking.py /work/cohorts/dev/visible -o /tmp/track-visible --jobs 2
    python benchmarks/tracking.py sample_studies/hard -o /tmp/track-hard --against previous

Runs the batch (resumable: an interrupted run continues), then for every patient links its follow-ups'
findings (`tracking.track_folders`) and names each finding by the truth change it is: the change of that visit
(`derivatives/changes/<patient>/<visit>/changes.json`, centre in the visit's space) nearest to the finding's
centre mapped into the follow-up by the pair's transform, within half the change's diameter + `--slack-mm`.

Printed: links (two consecutive appearances of one tracked lesion), correct links (both ends the same truth
change) / all links; the other links by kind: two different truth changes joined (a tracking error), a truth
change joined to a false finding, two false findings joined (a false finding that persists: the detector's
error, not the tracker's); and truth changes found at two or more follow-ups whose findings were given
different IDs (split tracks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from longitudinal.batch import run_batch  # noqa: E402
from longitudinal.tracking import RECORD_FILES, Tracking, TrackingSettings, track_folders  # noqa: E402


def truth_name(tracking: Tracking, k: int, fid: int, folder: Path, truth_root: Path, slack_mm: float) -> str | None:
    record = tracking.records[k]
    path = truth_root / tracking.patient / record.followup_visit / "changes.json"
    if not path.is_file():
        return None
    changes = json.loads(path.read_text())["changes"]
    centre = next(f.centre_mm for f in record.findings if f.id == fid)  # baseline space of the pair
    transform = sitk.ReadTransform(str(folder / "transform.tfm"))  # baseline -> follow-up points
    point = np.asarray(transform.TransformPoint(tuple(float(c) for c in centre)))
    best, best_distance = None, np.inf
    for change in changes:
        distance = float(np.linalg.norm(np.asarray(change["centre_mm"]) - point))
        if distance <= change["diameter_mm"] / 2 + slack_mm and distance < best_distance:
            best, best_distance = change["id"], distance
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--against", choices=("baseline", "previous"), default="baseline")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--pipeline", default=None, help="pipeline name or TOML (default: by image kind)")
    parser.add_argument("--max-distance-mm", type=float, default=TrackingSettings().max_distance_mm)
    parser.add_argument("--evaluate-only", action="store_true", help="no batch: evaluate what OUT holds")
    parser.add_argument("--slack-mm", type=float, default=3.0, help="how far outside a truth change a finding's "
                                                                    "centre may lie and still be that change")
    args = parser.parse_args(argv)

    if not args.evaluate_only:
        clock = time.perf_counter()
        summary = run_batch(args.studies, args.out, pipeline=args.pipeline, jobs=args.jobs, against=args.against,
                            progress=False, dicom_out=False)
        print(f"batch: {summary.ok} compared, {summary.skipped} from an earlier run, {summary.failed} failed "
              f"({time.perf_counter() - clock:.0f} s)")
    truth_root = args.studies / "derivatives" / "changes"
    settings = TrackingSettings(max_distance_mm=args.max_distance_mm)
    links = correct = swapped = half_false = both_false = split = multi_visit = patients = 0
    for patient in sorted(p for p in args.out.iterdir() if p.is_dir()):
        folders = sorted(f for f in patient.iterdir() if (f / RECORD_FILES["record"]).is_file())
        if len(folders) < 2:
            continue
        patients += 1
        tracking = track_folders(folders, patient.name, settings)
        name = {}
        for k, folder in enumerate(tracking.folders):
            for f in tracking.records[k].findings:
                name[(k, f.id)] = truth_name(tracking, k, f.id, folder, truth_root, args.slack_mm)
        for lesion in tracking.lesions:
            for a, b in zip(lesion.seen, lesion.seen[1:]):
                links += 1
                if name[a] is None and name[b] is None:
                    both_false += 1
                elif name[a] is None or name[b] is None:
                    half_false += 1
                elif name[a] == name[b]:
                    correct += 1
                else:
                    swapped += 1
        lesion_ids: dict[str, set[str]] = defaultdict(set)
        visits: dict[str, set[int]] = defaultdict(set)
        for lesion in tracking.lesions:
            for k, fid in lesion.seen:
                if name[(k, fid)] is not None:
                    lesion_ids[name[(k, fid)]].add(lesion.id)
                    visits[name[(k, fid)]].add(k)
        for truth, ids in lesion_ids.items():
            if len(visits[truth]) >= 2:
                multi_visit += 1
                split += len(ids) > 1
    accuracy = correct / links if links else float("nan")
    print(f"{patients} patient(s) with 2+ compared follow-ups, against {args.against}, max distance "
          f"{args.max_distance_mm} mm")
    print(f"links: {links}; correct: {correct} ({accuracy:.3f} correct links / all links); two truth changes "
          f"joined: {swapped}; a truth change joined to a false finding: {half_false}; two false findings joined: "
          f"{both_false}")
    print(f"truth changes found at 2+ follow-ups: {multi_visit}; split over several IDs: {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
