"""`longitudinal train`: the supervised road. Learn "same or different" from labelled pairs and synthetic changes.

Pairs with truth (`derivatives/changes/<patient>/<visit>/changemask.*`) are prepared by `compare.prepare` and
cached; patients are split into training and held-back ones (seeded, stratified by whether they changed).
Every output is written next to the model file MODEL:

- MODEL: the model (arrays + JSON, `modelfile`; never a pickle), its card inside;
- MODEL's stem + `.card.json` / `.card.md`: training data and its hash, settings, seed, epochs, time, metrics
  on held-back data;
- `.curves.csv` / `.curves.png`: per epoch, loss, accuracy, precision, recall and F1 on training and held-back
  patches (Siamese) and lesion-level F1 on held-back pairs every few epochs;
- `.roc.csv`, `.pr.csv`, `.roc-pr.png`: ROC and precision-recall curves on held-back voxels (Siamese) or
  regions (SVM, random forest).

Detection settings are chosen on a dev split; never point DATA at a validation split.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from ..errors import InputError
from ..settings import check, choices, require
from .pairs import PairArrays

log = logging.getLogger(__name__)

Kind = Literal["siamese", "svm", "rf"]
KINDS = choices(Kind)


@dataclass(frozen=True)
class TrainSettings:
    """How a model is trained; every field is recorded in the card."""

    kind: Kind = "siamese"
    epochs: int = 24
    steps: int = 60  # Siamese: batches per epoch
    batch_size: int = 16
    lr: float = 1e-3  # decoder; the encoder's stages get less (SiameseNet.parameter_groups)
    encoder_lr_factor: float = 0.1
    # Siamese: start the encoder from its ImageNet weights; False trains the same network from random weights
    # (the transfer-learning control: same data, budget and seed)
    pretrained: bool = True
    held_back: float = 0.3  # fraction of patients held back (at least one changed and one stable when possible)
    eval_every: int = 4  # epochs between lesion-level evaluations of the held-back pairs
    # Siamese, every eval_every epochs: whole-pair inference costs seconds a pair, so the rounds between use the
    # real held-back pairs only (the last round adds their pasted copies) and mine hard negatives on this many
    # training pairs (a different draw each round). On the dev split (35 + 19 pairs) a round on every pair took
    # longer than the 4 epochs before it.
    mine_pairs: int = 8
    held_back_patches: int = 192
    synthetic_per_pair: int = 2  # held-back pairs: pasted copies (3 changes each) besides the real pair
    threshold: float = 0.5  # probability above which a voxel is flagged (held-back lesion metrics)
    seed: int = 0
    device: str = "cpu"
    # torch threads. One: on a shared machine two-thread kernels spin against other jobs (measured at load 8 on
    # 2 cores: a training step took 0.4 s wall with one thread, 2.9-6.6 s with two); batch runs use processes
    threads: int = 1
    max_minutes: float = 30.0  # training stops after the epoch that crosses this (recorded in the card)

    def __post_init__(self) -> None:
        check(self)
        for key in ("epochs", "steps", "batch_size"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(0.0 < self.held_back < 1.0, "held_back", f"must be in (0, 1), got {self.held_back}")


class TrainedModel(Protocol):
    def save(self, path: Path, card: dict) -> None: ...


@dataclass(eq=False)
class TrainResult:
    """What `train` needs from every model kind to write the model, its card and its curves."""

    model: TrainedModel
    history: list[dict]  # rows of CURVE_COLUMNS
    curves: dict  # curve_points(...) + "unit"
    metrics: dict  # held-back figures
    requires: dict  # what a pipeline must match (check_requirements)
    settings: dict  # kind-specific settings for the card
    epochs_run: int
    stopped_early: bool
    seconds: float

    def save(self, path: Path, card: dict) -> None:
        self.model.save(path, card)


@dataclass(frozen=True)
class Outputs:
    """Where `train` writes, all next to the model file."""

    model: Path

    def sibling(self, suffix: str) -> Path:
        name = self.model.name
        stem = name[: -len(self.model.suffix)] if self.model.suffix else name
        return self.model.with_name(stem + suffix)

    @property
    def card_json(self) -> Path:
        return self.sibling(".card.json")

    @property
    def card_md(self) -> Path:
        return self.sibling(".card.md")


# ----------------------------------------------------------------------------------------- data and splits


def split_patients(pairs: list[PairArrays], fraction: float, seed: int) -> tuple[list[PairArrays], list[PairArrays]]:
    """(training, held-back) pairs, split by patient: changed and stable patients are held back in proportion."""
    rng = np.random.default_rng(seed)
    patients = sorted({p.patient for p in pairs})
    changed = {p.patient for p in pairs if p.changed}
    held: set[str] = set()
    for group in (sorted(changed), sorted(set(patients) - changed)):
        if len(group) < 2:
            continue
        k = max(1, int(round(fraction * len(group))))
        held |= {group[i] for i in rng.permutation(len(group))[:k]}
    if not held or held == set(patients):
        if len(patients) < 2:
            raise InputError(None, "training needs labelled pairs of at least 2 patients (one is held back)")
        held = {patients[int(rng.integers(len(patients)))]}
    return [p for p in pairs if p.patient not in held], [p for p in pairs if p.patient in held]


def data_digest(pairs: list[PairArrays]) -> str:
    """sha256 over the voxels of every pair (order-free): the same data gives the same hash anywhere."""
    h = hashlib.sha256()
    for d in sorted(p.digest() for p in pairs):
        h.update(d.encode())
    return h.hexdigest()


def synthetic_copies(pair: PairArrays, n: int, changes: int, rng: np.random.Generator) -> list[PairArrays]:
    """`n` copies of a pair, each with `changes` synthetic changes pasted at tissue voxels away from its truth."""
    from scipy import ndimage

    from .synthetic import pick_centre, random_change

    out = []
    spacing = pair.spacing
    for i in range(n):
        b, f, truth = pair.baseline, pair.followup, pair.truth.copy()
        for _ in range(changes):
            free = pair.mask & ~ndimage.binary_dilation(truth, iterations=8)
            if not free.any():
                break
            kind = ("new_lesion", "growing_lesion", "atrophy")[int(rng.integers(3))]
            centre = pick_centre(b, free, kind, rng, pair.rgb)
            paste = random_change(b, f, free, spacing, rng, rgb=pair.rgb, centre=centre)
            b, f, truth = paste.baseline, paste.followup, truth | paste.truth
        out.append(dataclasses.replace(pair, key=f"{pair.key}+synthetic{i + 1}", baseline=b, followup=f, truth=truth))
    return out


# ----------------------------------------------------------------------------------------- metrics


def confusion(prob: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """[tp, fp, fn, tn] of voxels."""
    pred = prob >= threshold
    truth = truth.astype(bool)
    return np.array([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum(), (~pred & ~truth).sum()],
                    dtype=np.int64)


def rates(counts: np.ndarray) -> dict[str, float]:
    tp, fp, fn, tn = (float(v) for v in counts)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"accuracy": (tp + tn) / max(tp + fp + fn + tn, 1.0), "precision": precision, "recall": recall, "f1": f1}


def lesion_summary(rows: list[dict]) -> dict[str, float]:
    """Pooled lesion-level figures over pairs (rows of evaluation.lesion_metrics)."""
    truth = sum(r["truth_lesions"] for r in rows)
    found = sum(r["found_lesions"] for r in rows)
    flagged = sum(r["flagged_findings"] for r in rows)
    true_findings = sum(r["true_findings"] for r in rows)
    sens = found / truth if truth else float("nan")
    prec = true_findings / flagged if flagged else float("nan")
    f1 = 2 * sens * prec / (sens + prec) if truth and flagged and sens + prec > 0 else 0.0
    return {"lesion_sensitivity": sens, "lesion_precision": prec, "lesion_f1": f1,
            "false_positive_findings_per_pair": sum(r["false_positive_findings"] for r in rows) / max(len(rows), 1),
            "truth_lesions": truth, "found_lesions": found, "pairs": len(rows)}


# final held-back lesion figures at each probability threshold: balanced training makes probabilities high
# compared with a whole scan's prevalence of change; the lead's calibration sets the operating point
LESION_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)


def lesion_by_threshold(rows: dict[float, list[dict]], pairs: list[PairArrays]) -> dict[float, dict]:
    """{threshold: lesion_summary of all pairs, plus `real_` figures of the pairs without pasted changes}."""
    real = [not p.key.rpartition("+")[2].startswith("synthetic") for p in pairs]
    out = {}
    for t, r in rows.items():
        real_rows = [row for row, is_real in zip(r, real) if is_real]
        out[t] = {**lesion_summary(r), **{f"real_{k}": v for k, v in lesion_summary(real_rows).items()}}
    return out


def curve_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 400) -> dict:
    """ROC and precision-recall curves (thinned to `max_points`), their AUC and average precision."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        return {"roc_auc": float("nan"), "average_precision": float("nan"), "roc": [], "pr": []}
    fpr, tpr, thr = roc_curve(labels, scores)
    prec, rec, pthr = precision_recall_curve(labels, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).astype(int))
    pkeep = np.unique(np.linspace(0, len(prec) - 1, min(len(prec), max_points)).astype(int))
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        "roc": [(float(fpr[i]), float(tpr[i]), float(thr[i])) for i in keep],
        "pr": [(float(rec[i]), float(prec[i]), float(pthr[min(i, len(pthr) - 1)])) for i in pkeep],
    }


# ----------------------------------------------------------------------------------------- writing


def _csv_text(header: list[str], rows: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if (isinstance(v, float) and math.isnan(v)) else (f"{v:.6g}" if isinstance(v, float) else v)
                    for v in r])
    return buf.getvalue()


CURVE_COLUMNS = ["epoch", "split", "loss", "accuracy", "precision", "recall", "f1", "lesion_f1",
                 "lesion_sensitivity", "lesion_precision", "false_positive_findings_per_pair",
                 "mined_hard_negatives", "seconds"]


def write_curves(outputs: Outputs, history: list[dict], curves: dict) -> dict[str, str]:
    """CSV and PNG of the per-epoch metrics and of the ROC / precision-recall curves; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write, atomic_write_text

    files = {"curves_csv": outputs.sibling(".curves.csv"), "curves_png": outputs.sibling(".curves.png"),
             "roc_csv": outputs.sibling(".roc.csv"), "pr_csv": outputs.sibling(".pr.csv"),
             "roc_pr_png": outputs.sibling(".roc-pr.png")}
    atomic_write_text(files["curves_csv"], _csv_text(CURVE_COLUMNS, [[h.get(c, float("nan")) for c in CURVE_COLUMNS]
                                                                     for h in history]))
    atomic_write_text(files["roc_csv"], _csv_text(["false_positive_rate", "true_positive_rate", "threshold"], curves["roc"]))
    atomic_write_text(files["pr_csv"], _csv_text(["recall", "precision", "threshold"], curves["pr"]))

    metrics = ["loss", "accuracy", "precision", "recall", "f1", "lesion_f1"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, m in zip(axes.flat, metrics):
        for split, style in (("train", "-"), ("held_back", "--")):
            pts = [(h["epoch"], h[m]) for h in history if h["split"] == split and m in h and not math.isnan(h[m])]
            if pts:
                ax.plot(*zip(*pts), style, marker="o" if m == "lesion_f1" else None, label=split.replace("_", "-"))
        ax.set_title(m.replace("_", " ") + (" (held-back pairs)" if m == "lesion_f1" else " (patches)"))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, files["curves_png"], atomic_write)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
    if curves["roc"]:
        a1.plot([p[0] for p in curves["roc"]], [p[1] for p in curves["roc"]])
        a2.plot([p[0] for p in curves["pr"]], [p[1] for p in curves["pr"]])
    a1.plot([0, 1], [0, 1], ":", color="gray")
    a1.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, AUC {curves['roc_auc']:.3f}")
    a2.set(xlabel="recall", ylabel="precision", title=f"precision-recall, AP {curves['average_precision']:.3f}")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.suptitle(f"held-back {curves.get('unit', 'voxels')}")
    fig.tight_layout()
    _save_fig(fig, files["roc_pr_png"], atomic_write)
    plt.close("all")
    return {k: v.name for k, v in files.items()}


def _save_fig(fig, path: Path, atomic_write) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))


def card_markdown(card: dict) -> str:
    m = card["metrics"]
    data = card["training_data"]
    lines = [
        f"# Model card: {card['kind']} change detector",
        "",
        f"- Created {card['created']} by longitudinal {card['versions']['longitudinal']} "
        f"(torch {card['versions']['torch']}, monai {card['versions']['monai']}, scikit-learn {card['versions']['sklearn']})",
        f"- Pipeline `{card['requires']['pipeline']}`; requires {', '.join(f'{k} = {v}' for k, v in card['requires'].items() if k != 'features')}",
        f"- Seed {card['seed']}, {card['epochs_run']} of {card['settings']['train']['epochs']} epochs, "
        f"{card['seconds']:.0f} s wall, {card['cpu_seconds']:.0f} s CPU (whole run, preparation included) on "
        f"{card['settings']['train']['device']} ({card['settings']['train']['threads']} threads)"
        + (f"; stopped by the {card['settings']['train']['max_minutes']} min budget" if card.get("stopped_early") else ""),
        "",
        "## Training data",
        "",
        f"- {data['pairs']} labelled pairs of {data['patients']} patients from {', '.join(data['folders'])}: "
        f"{data['train_pairs']} for training, {data['held_back_pairs']} held back (by patient)",
        f"- Voxel hash (sha256 over every pair's arrays): `{data['sha256']}`",
        f"- Synthetic changes pasted on the fly into training pairs: {card['settings'].get('synthetic', 'none')}",
        "",
        "## Held-back metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in m.items():
        if isinstance(v, (int, float)):
            lines.append(f"| {k.replace('_', ' ')} | {v:.4g} |" if isinstance(v, float) else f"| {k.replace('_', ' ')} | {v} |")
    by_threshold = m.get("lesion_by_threshold") or {}
    if by_threshold:
        lines += ["", "Lesion level on held-back pairs by probability threshold (all / real pairs only):", "",
                  "| threshold | sensitivity | false findings per pair | lesion F1 | real: sensitivity | real: false "
                  "findings per pair | real: lesion F1 |", "|---|---|---|---|---|---|---|"]
        for t, v in by_threshold.items():
            lines.append(f"| {t} | {v['lesion_sensitivity']:.3f} | {v['false_positive_findings_per_pair']:.2f} | "
                         f"{v['lesion_f1']:.3f} | {v.get('real_lesion_sensitivity', float('nan')):.3f} | "
                         f"{v.get('real_false_positive_findings_per_pair', float('nan')):.2f} | "
                         f"{v.get('real_lesion_f1', float('nan')):.3f} |")
    lines += ["", "Curves: " + ", ".join(f"`{v}`" for v in card["files"].values()), ""]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import monai
    import sklearn
    import torch

    from .. import __version__

    return {"longitudinal": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "sklearn": sklearn.__version__}


def requirements(pipeline, kind: str, extra: dict | None = None) -> dict:
    """What a pipeline must match for a model of `kind` to be used (the card's "requires"; `check_requirements`
    compares the keys a pipeline determines): its name, its registration and preprocessing (they shape what the
    model sees), and the encoder (Siamese: the backbone it was fine-tuned from; SVM/RF: the one whose features
    it reads, with the change maps). `extra`: what only the model knows (channels, patch, feature names)."""
    from .pairs import pipeline_digest

    prep = type(pipeline)(pipeline.name, pipeline.version, "", pipeline.modality, "",
                          {k: pipeline.stages[k] for k in ("registration", "preprocessing") if k in pipeline.stages})
    out = {"pipeline": pipeline.name, "preprocessing_sha256": pipeline_digest(prep)[:16],
           "encoder": pipeline.encoding.name}
    if kind in ("svm", "rf"):
        out["encoder_stages"] = list(pipeline.encoding.stages or ())
        out["maps"] = list(pipeline.scoring.maps)
    return {**out, **(extra or {})}


def check_requirements(card: dict, required: dict, source) -> None:
    """One-line InputError naming the first field where a model's card and the pipeline disagree."""
    have = card.get("requires", {})
    for key, value in required.items():
        if key in have and _plain(have[key]) != _plain(value):
            shown = lambda v: (f"{len(v)} features" if isinstance(v, list) and len(v) > 4 else repr(v))  # noqa: E731
            raise InputError(source, f"model card does not match the pipeline: {key} is {shown(have[key])} in the "
                                     f"model, {shown(value)} in the pipeline")
    missing = [k for k in required if k not in have]
    if missing:
        raise InputError(source, f"model card lacks {', '.join(missing)}: not a model for this pipeline")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------------------- orchestration


def train(data: list[Path], out: Path, pipeline_name: str | None = None, settings: TrainSettings = TrainSettings(),
          cache: Path | None = None) -> dict:
    """Train a model of `settings.kind` on every labelled pair under `data`; write it and its card; the card."""
    import torch

    from .pairs import cached_pairs, labelled_pairs, pipeline_for

    if settings.device != "cpu" and not (settings.device.startswith("cuda") and torch.cuda.is_available()):
        raise InputError(None, f"device {settings.device!r} is not available here (CUDA: {torch.cuda.is_available()})")
    for folder in data:
        if "validation" in Path(folder).resolve().parts:
            raise InputError(folder, "refusing to train on a validation split (train and tune on dev only)")
    outputs = Outputs(Path(out))
    outputs.model.parent.mkdir(parents=True, exist_ok=True)
    sources = labelled_pairs([Path(d) for d in data])
    pipeline = pipeline_for(sources, pipeline_name)
    cache = Path(cache) if cache else outputs.sibling(".cache")
    clock, cpu_clock = time.perf_counter(), time.process_time()
    pairs = cached_pairs(sources, pipeline, cache)
    prepare_s = time.perf_counter() - clock
    train_pairs, held_pairs = split_patients(pairs, settings.held_back, settings.seed)
    log.info("training on %d pairs, %d held back", len(train_pairs), len(held_pairs))
    if settings.kind == "siamese":
        from .siamese_training import train_siamese

        result = train_siamese(train_pairs, held_pairs, pipeline, settings)
    else:
        from .regional import train_regional

        result = train_regional(train_pairs, held_pairs, pipeline, settings, cache)
    files = write_curves(outputs, result.history, result.curves)
    card = {
        "kind": settings.kind,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "requires": result.requires,
        "seed": settings.seed,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 1),
        # wall time depends on what else runs on the machine; CPU time of this process does less
        "cpu_seconds": round(time.process_time() - cpu_clock, 1),
        "prepare_seconds": round(prepare_s, 1),
        "settings": {"train": asdict(settings), **result.settings},
        "training_data": {
            "folders": [Path(d).name for d in data], "pairs": len(pairs),
            "patients": len({p.patient for p in pairs}), "sha256": data_digest(pairs),
            "train_pairs": len(train_pairs), "held_back_pairs": len(held_pairs),
            "train_changed_pairs": sum(p.changed for p in train_pairs),
            "held_back_changed_pairs": sum(p.changed for p in held_pairs),
            # pairs named by a hash of their voxels, never by patient id
            "split": {p.digest()[:12]: "held_back" if p in held_pairs else "train" for p in pairs},
        },
        "metrics": {**result.metrics, "roc_auc": result.curves["roc_auc"],
                    "average_precision": result.curves["average_precision"]},
        "files": files,
    }
    from ..io import atomic_write_text
    from ..report import jsonable

    result.save(outputs.model, card)
    atomic_write_text(outputs.card_json, json.dumps(jsonable(card), indent=1, sort_keys=True))
    atomic_write_text(outputs.card_md, card_markdown(card))
    return card


# ----------------------------------------------------------------------------------------- command line


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", type=Path, nargs="+",
                   help="folders of studies with derivatives/changes truth (a dev split; never validation)")
    p.add_argument("-o", "--out", metavar="MODEL", type=Path, required=True,
                   help="model file to write (arrays + JSON); card, curves and ROC/PR are written beside it")
    p.add_argument("--pipeline", help="pipeline name or file (default: chosen from the first baseline)")
    p.add_argument("--kind", choices=KINDS, default="siamese", help="model: siamese network (default), svm or rf")
    p.add_argument("--epochs", type=int, default=TrainSettings.epochs, help="Siamese: epochs (default %(default)s)")
    p.add_argument("--steps", type=int, default=TrainSettings.steps, help="Siamese: batches per epoch")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--random-init", action="store_true",
                   help="Siamese: start the encoder from random weights instead of ImageNet's (the control)")
    p.add_argument("--threads", type=int, default=TrainSettings.threads, help="torch threads (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, sampling and initialisation")
    p.add_argument("--held-back", type=float, default=TrainSettings.held_back, help="fraction of patients held back")
    p.add_argument("--max-minutes", type=float, default=TrainSettings.max_minutes, help="training time budget")
    p.add_argument("--cache", type=Path, help="folder of prepared pairs (default: MODEL's name + .cache)")


def train_command(args: argparse.Namespace) -> int:
    try:
        settings = TrainSettings(kind=args.kind, epochs=args.epochs, steps=args.steps, device=args.device,
                                 threads=args.threads, pretrained=not args.random_init,
                                 seed=args.seed, held_back=args.held_back, max_minutes=args.max_minutes)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    card = train(args.data, args.out, args.pipeline, settings, args.cache)
    m = card["metrics"]
    print(f"{card['kind']} model trained in {card['seconds']:.0f} s on {card['training_data']['train_pairs']} pairs: "
          f"{args.out}; held back: lesion F1 {m.get('lesion_f1', float('nan')):.3f}, "
          f"AUROC {m['roc_auc']:.3f}, AP {m['average_precision']:.3f}")
    return 0
