"""Every metric on the dev split (settings tuned there) beside the validation split (never tuned on).

    python benchmarks/generalisation.py --cohorts /work/cohorts -o /work/generalisation [--sets visible subtle
        fundus realhead] [--methods ours,subtraction,random-encoder] [--jobs 2] [--reuse]

Runs `longitudinal evaluate` on `<cohorts>/<split>/<set>` for both splits (`--reuse`: read an earlier run's
metrics.json instead), then prints one table per set and subgroup with dev and validation side by side and the gap.
A gap larger than 0.1 in sensitivity or pair AUROC is marked: a finding to explain, not to hide.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from longitudinal.evaluation import METHODS, evaluate

SPLITS = ("dev", "validation")
COLUMNS = (("lesion_sensitivity", "sensitivity"), ("false_positives_per_pair", "FP/pair"),
           ("false_positives_per_stable_pair", "FP/stable"), ("lesion_f1", "F1"), ("pair_auroc", "pair AUROC"),
           ("volume_within_tolerance", "vol +-30 %"), ("findings_outside_brain", "outside brain"),
           ("pairs_not_comparable", "not comp."))
GAP_CHECKED = ("lesion_sensitivity", "pair_auroc")


def _f(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(title: str, dev: dict, val: dict) -> list[str]:
    lines = [f"### {title}", "", "| method | " + " | ".join(f"{name} dev / val" for _, name in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for method in dev:
        if method not in val:
            continue
        cells = []
        for key, _ in COLUMNS:
            a, b = dev[method].get(key), val[method].get(key)
            gap = ""
            if key in GAP_CHECKED and isinstance(a, float) and isinstance(b, float) and abs(a - b) > 0.1:
                gap = " **gap**"
            cells.append(f"{_f(a)} / {_f(b)}{gap}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohorts", type=Path, required=True, help="folder holding dev/ and validation/")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--sets", nargs="+", default=["visible", "subtle", "fundus", "realhead"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pipeline", help="pipeline name or file (default: chosen from the images)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="read OUT/<split>/<set>/metrics.json if present")
    args = ap.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    docs: dict[tuple[str, str], dict] = {}
    for name in args.sets:
        for split in SPLITS:
            studies, out = args.cohorts / split / name, args.out / split / name
            if not studies.is_dir():
                continue
            if args.reuse and (out / "metrics.json").is_file():
                docs[(split, name)] = json.loads((out / "metrics.json").read_text())
            else:
                docs[(split, name)] = evaluate(studies, out, args.pipeline, args.jobs, methods)
    lines = ["# Dev (tuned on) beside validation (never tuned on)", ""]
    for name in args.sets:
        if (("dev", name) not in docs) or (("validation", name) not in docs):
            continue
        dev, val = docs[("dev", name)], docs[("validation", name)]
        lines.append(f"## {name}: {dev['pairs']} / {val['pairs']} pairs ({dev['stable_pairs']} / "
                     f"{val['stable_pairs']} stable); brain Dice {_f(dev.get('brain_dice_mean'))} / "
                     f"{_f(val.get('brain_dice_mean'))} (min {_f(dev.get('brain_dice_min'))} / "
                     f"{_f(val.get('brain_dice_min'))}); registration QC passed {dev['registration_ok']}/{dev['pairs']}"
                     f" / {val['registration_ok']}/{val['pairs']}")
        lines.append("")
        lines += table("all pairs", dev["summary"], val["summary"])
        for sub in dev.get("subgroups", {}):
            if sub in val.get("subgroups", {}):
                lines += table(sub, dev["subgroups"][sub], val["subgroups"][sub])
        lines += ["calibration on stable pairs (ours; setting: see the pipeline's false_findings_per_pair):", "",
                  "| voxels | cut FOV | dev pairs | dev FP/pair | val pairs | val FP/pair |", "|---|---|---|---|---|---|"]
        val_cal = {(c["voxels"], c["cut_fov"]): c for c in val.get("calibration", [])}
        for c in dev.get("calibration", []):
            v = val_cal.get((c["voxels"], c["cut_fov"]), {})
            lines.append(f"| {c['voxels']} | {c['cut_fov']} | {c['stable_pairs']} | {_f(c['false_findings_per_pair'])}"
                         f" | {v.get('stable_pairs', '-')} | {_f(v.get('false_findings_per_pair'))} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generalisation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
