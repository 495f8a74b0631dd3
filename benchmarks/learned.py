"""Supervised detectors: training time, inference time added to a 1 mm brain pair, peak memory.

    python benchmarks/learned.py --model MODEL [MODEL ...]          # models already trained
    python benchmarks/learned.py --train sample_studies/easy sample_studies/hard --kind siamese [--epochs N]

Training (with --train) runs `longitudinal train` in a fresh process: wall and CPU seconds, peak RSS. Inference
runs in a fresh process per model on the 1 mm pair of benchmarks/compare.py (nilearn's MNI152 T1, 197x233x189,
moved, with a new 6 mm lesion): the pair is prepared first (registration and harmonisation, which compare does
anyway), then only what the model adds is timed - Siamese: `change_probability`; SVM/RF: loading (a refit) and
`predict_regions` on the pair's region features. Goal: <= 5 s added per pair on 2 cores. Peak RSS is that of
the whole process (preparation included). The machine's load average is printed: other jobs slow everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import LESION_MM, make_pair, run_child  # noqa: E402  (benchmarks/compare.py)

INFER_SCRIPT = r"""
import json, sys, time
import numpy as np
from longitudinal.io import load_image
from longitudinal.compare import prepare, encode_prepared, region_features_prepared
from longitudinal.learned import load_model, change_probability, predict_regions, SiameseModel
threads = int(sys.argv[4])
baseline, followup = load_image(sys.argv[1]), load_image(sys.argv[2])
t = time.perf_counter()
prepared = prepare(baseline, followup)
prepare_s = time.perf_counter() - t
t = time.perf_counter()
model = load_model(sys.argv[3], prepared.pipeline)
load_s = time.perf_counter() - t
out = {"prepare_s": prepare_s, "load_s": load_s}
if isinstance(model, SiameseModel):
    change_probability(model, prepared, threads=threads)  # warm-up: first calls allocate and pick kernels
    t, cpu = time.perf_counter(), time.process_time()
    result = change_probability(model, prepared, threads=threads)
    out.update(infer_s=time.perf_counter() - t, infer_cpu_s=time.process_time() - cpu, slices=result.slices,
               working_shape=result.info.get("working_shape"))
    prob = result.probability
    centre = prepared.baseline.itk.TransformPhysicalPointToIndex(LESION_MM)[::-1]
    z, y, x = centre
    out["lesion_max_probability"] = float(prob[z - 2:z + 3, y - 2:y + 3, x - 2:x + 3].max())
    out["voxels_over_0.5"] = int((prob >= 0.5).sum())
else:
    fb, ff, _ = encode_prepared(prepared)
    X, names, regions, labels, _ = region_features_prepared(prepared, prepared.pipeline.scoring, fb, ff)
    t, cpu = time.perf_counter(), time.process_time()
    scores = predict_regions(model, X, names)
    out.update(infer_s=time.perf_counter() - t, infer_cpu_s=time.process_time() - cpu, regions=len(scores))
print(json.dumps(out))
""".replace("LESION_MM", repr(LESION_MM))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", type=Path, default=[], help="trained model files")
    ap.add_argument("--train", nargs="*", type=Path, default=[], help="train on these folders first")
    ap.add_argument("--kind", default="siamese", choices=("siamese", "svm", "rf"))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--out", type=Path, help="where a trained model goes (default: a temporary folder)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads of the Siamese inference")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = list(args.model)
        if args.train:
            model = args.out or tmp / f"{args.kind}.npz"
            cmd = [sys.executable, "-m", "longitudinal.cli", "train", *map(str, args.train), "-o", str(model),
                   "--kind", args.kind] + (["--epochs", str(args.epochs)] if args.epochs else [])
            wall, cpu, rss, _ = run_child(cmd)
            print(f"\ntrain --kind {args.kind} on {', '.join(p.name for p in args.train)}: wall {wall:.0f} s, "
                  f"CPU {cpu:.0f} s, peak RSS {rss:.0f} MB")
            models.append(model)
        baseline, followup = make_pair(tmp)
        for model in models:
            card_path = model.with_name(model.name[: -len(model.suffix)] + ".card.json")
            card = json.loads(card_path.read_text()) if card_path.is_file() else {}
            if card:
                m = card.get("metrics", {})
                print(f"\n{model.name}: {card['kind']}, trained {card['seconds']:.0f} s wall / "
                      f"{card.get('cpu_seconds', float('nan')):.0f} s CPU, {card['epochs_run']} epochs; held back: "
                      f"lesion F1 {m.get('lesion_f1', float('nan')):.3f}, AUROC {m.get('roc_auc', float('nan')):.3f}")
            for threads in args.threads if card.get("kind", "siamese") == "siamese" else [1]:
                wall, cpu, rss, out = run_child([sys.executable, "-c", INFER_SCRIPT, str(baseline), str(followup),
                                                 str(model), str(threads)])
                r = json.loads(out.strip().splitlines()[-1])
                extra = (f"{threads} thread(s), {r['slices']} slices at working shape {r['working_shape']}; 6 mm lesion "
                         f"max probability {r['lesion_max_probability']:.3f}, {r['voxels_over_0.5']} voxels >= 0.5"
                         if "slices" in r else f"{r['regions']} regions")
                print(f"  1 mm pair (197x233x189): added {r['infer_s']:.2f} s wall ({r['infer_cpu_s']:.2f} s CPU) + "
                      f"model load {r['load_s']:.2f} s; {extra}")
                print(f"  (prepare {r['prepare_s']:.1f} s, not counted); process peak RSS {rss:.0f} MB; load average "
                      f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
