"""Training loop of the Siamese detector: balanced patches, BCE + soft Dice, per-stage learning rates."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from .pairs import PairArrays
from .sampling import Batch, PatchSampler, SamplingSettings, prepare_for_sampling
from .siamese import SiameseModel, SiameseNet, SiameseSettings, probability_of_arrays
from .training import (LESION_THRESHOLDS, TrainResult, TrainSettings, confusion, curve_points, lesion_by_threshold, rates,
                       requirements, synthetic_copies)

log = logging.getLogger(__name__)


def loss_of(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice over the batch: BCE alone lets a few lesion voxels drown in
    thousands of unchanged ones; Dice rewards getting the lesion's extent."""
    bce = F.binary_cross_entropy_with_logits(logits, truth)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * truth).sum() + 1) / (prob.sum() + truth.sum() + 1)
    return bce + dice


def median_spacing(pairs: list[PairArrays]) -> tuple[float, ...]:
    return tuple(float(v) for v in np.median(np.array([p.spacing for p in pairs]), axis=0))


def evaluate_patches(net: SiameseNet, batch: Batch, device: str, chunk: int = 32) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, probabilities inside the mask, their truth) of fixed patches."""
    net.eval()
    losses, probs, truths = [], [], []
    with torch.inference_mode():
        for i in range(0, len(batch.baseline), chunk):
            sl = slice(i, i + chunk)
            logits = net(batch.baseline[sl].to(device), batch.followup[sl].to(device)).cpu()
            truth = batch.truth[sl]
            losses.append(float(loss_of(logits, truth)) * len(truth))
            m = batch.mask[sl]
            probs.append(torch.sigmoid(logits)[m].numpy())
            truths.append(truth[m].numpy() > 0.5)
    net.train()
    return sum(losses) / len(batch.baseline), np.concatenate(probs), np.concatenate(truths)


def evaluate_pairs(model: SiameseModel, pairs: list[PairArrays], thresholds: tuple[float, ...], threads: int,
                   voxels_per_pair: int = 20000, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Lesion-level figures on whole held-back pairs at each threshold ({threshold: summary}, with `real_`
    figures of the pairs without pasted changes), and a sample of
    (probability, truth) voxels for ROC/PR (every truth voxel, and up to `voxels_per_pair` others of the mask)."""
    from ..evaluation import lesion_metrics

    rng = np.random.default_rng(seed)
    rows: dict[float, list] = {t: [] for t in thresholds}
    scores, labels = [], []
    for pair in pairs:
        result = probability_of_arrays(model, pair.baseline, pair.followup, pair.mask, pair.spacing, threads=threads)
        prob = result.probability
        for t in thresholds:
            rows[t].append(lesion_metrics(pair.truth, (prob >= t) & pair.mask))
        inside = np.flatnonzero(pair.mask & ~pair.truth)
        pick = rng.choice(inside, min(voxels_per_pair, inside.size), replace=False)
        truth_idx = np.flatnonzero(pair.truth)
        scores += [prob.ravel()[pick], prob.ravel()[truth_idx]]
        labels += [np.zeros(pick.size, bool), np.ones(truth_idx.size, bool)]
    return lesion_by_threshold(rows, pairs), np.concatenate(scores), np.concatenate(labels)


def mine_hard_negatives(model: SiameseModel, pairs: list[PairArrays], sampler: PatchSampler, threshold: float,
                        threads: int, seed: int, per_pair: int = 2000) -> int:
    """Run the model on each training pair; unchanged voxels (3 voxels or more from truth) it flags at
    `threshold` become that pair's mined hard negatives, on the working grid. Returns how many were found."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    found = 0
    for pair in pairs:
        prob = probability_of_arrays(model, pair.baseline, pair.followup, pair.mask, pair.spacing,
                                     threads=threads).probability
        near = ndimage.binary_dilation(pair.truth, iterations=3) if pair.truth.any() else pair.truth
        voxels = np.argwhere((prob >= threshold) & pair.mask & ~near)
        found += len(voxels)
        if len(voxels) > per_pair:
            voxels = voxels[rng.choice(len(voxels), per_pair, replace=False)]
        spatial = pair.mask.shape
        scale = np.array([s / t for s, t in zip(pair.spacing, model.spacing)])
        working = np.floor(voxels * scale).astype(np.int64)
        if len(spatial) == 2:  # 2D images are one slice of the working grid
            working = np.c_[np.zeros(len(working), np.int64), working]
        sampler.mine(pair.key, working)
    return found


def train_siamese(train_pairs: list[PairArrays], held_pairs: list[PairArrays], pipeline, settings: TrainSettings,
                  net_settings: SiameseSettings = SiameseSettings(),
                  sampling: SamplingSettings | None = None) -> TrainResult:
    clock = time.perf_counter()
    device = settings.device
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    sampling = sampling or SamplingSettings(patch=net_settings.patch, context=net_settings.context)
    spacing = median_spacing(train_pairs)
    rgb = bool(train_pairs[0].rgb)
    try:
        train_prepped = [prepare_for_sampling(p, spacing, net_settings.context) for p in train_pairs]
        held_prepped = [prepare_for_sampling(p, spacing, net_settings.context) for p in held_pairs]
        sampler = PatchSampler(train_prepped, sampling, settings.seed)
        held_batch = PatchSampler(held_prepped, sampling, settings.seed + 1).batch(settings.held_back_patches,
                                                                                  augment=False)

        def held_full() -> list[PairArrays]:
            """The held-back pairs and their pasted copies (made when the last round needs them: 2.7 GB on dev)."""
            rng = np.random.default_rng(settings.seed + 2)
            return list(held_pairs) + [c for p in held_pairs
                                       for c in synthetic_copies(p, settings.synthetic_per_pair, 3, rng)]

        torch.manual_seed(settings.seed)
        net = SiameseNet(net_settings, pretrained=settings.pretrained, seed=settings.seed,
                         frozen_norm=settings.pretrained).to(device)
        net.train()
        # a random encoder has no early filters to protect: every stage learns at the decoder's rate
        groups = (net.parameter_groups(settings.lr, settings.encoder_lr_factor) if settings.pretrained
                  else net.parameter_groups(settings.lr, 1.0, 1.0))
        optimiser = torch.optim.AdamW(groups, weight_decay=1e-4)
        model = SiameseModel(net, spacing, rgb, {})
        history: list[dict] = []
        stopped_early = False
        epochs_run = 0
        lesion: dict = {}
        by_threshold: dict = {}
        scores = labels = np.zeros(0)
        for epoch in range(1, settings.epochs + 1):
            t_epoch = time.perf_counter()
            counts = np.zeros(4, np.int64)
            total = 0.0
            for _ in range(settings.steps):
                batch = sampler.batch(settings.batch_size)
                logits = net(batch.baseline.to(device), batch.followup.to(device))
                loss = loss_of(logits, batch.truth.to(device))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
                m = batch.mask
                counts += confusion(torch.sigmoid(logits.detach().cpu())[m].numpy(), batch.truth[m].numpy() > 0.5,
                                    settings.threshold)
            history.append({"epoch": epoch, "split": "train", "loss": total / settings.steps, **rates(counts),
                            "seconds": round(time.perf_counter() - clock, 1)})
            held_loss, p, t = evaluate_patches(net, held_batch, device)
            row = {"epoch": epoch, "split": "held_back", "loss": held_loss, **rates(confusion(p, t, settings.threshold))}
            epochs_run = epoch
            over_budget = (time.perf_counter() - clock) / 60 > settings.max_minutes
            last = epoch == settings.epochs or over_budget
            if epoch % settings.eval_every == 0 or last:
                model.net = net.eval()
                if not last:
                    pick = np.random.default_rng(settings.seed + epoch).permutation(len(train_pairs))
                    mined_on = [train_pairs[i] for i in sorted(pick[:settings.mine_pairs])]
                    n_mined = mine_hard_negatives(model, mined_on, sampler, settings.threshold, settings.threads,
                                                  settings.seed + epoch)
                    row["mined_hard_negatives"] = n_mined
                thresholds = tuple(sorted({settings.threshold, *LESION_THRESHOLDS})) if last else (settings.threshold,)
                by_threshold, scores, labels = evaluate_pairs(model, held_full() if last else list(held_pairs),
                                                              thresholds, settings.threads, seed=settings.seed)
                lesion = by_threshold[settings.threshold]
                net.train()
                row.update(lesion)
            row["seconds"] = round(time.perf_counter() - clock, 1)
            history.append(row)
            log.info("epoch %d: train loss %.4f f1 %.3f | held-back loss %.4f f1 %.3f%s (%.0f s)", epoch,
                     history[-2]["loss"], history[-2]["f1"], held_loss, row["f1"],
                     f" lesion F1 {row['lesion_f1']:.3f}" if "lesion_f1" in row else "", time.perf_counter() - t_epoch)
            if over_budget and epoch < settings.epochs:
                stopped_early = True
                break
        net.eval()
        curves = {**curve_points(scores, labels), "unit": "voxels (whole pairs, real and with pasted changes)"}
        final_patch = {f"patch_{k}": v for k, v in history[-1].items() if k in ("loss", "accuracy", "precision",
                                                                              "recall", "f1")}
        metrics = {**final_patch, **lesion, "lesion_by_threshold": {str(t): v for t, v in by_threshold.items()},
                   "held_back_pairs_real": len(held_pairs),
                   "held_back_pairs_synthetic": settings.synthetic_per_pair * len(held_pairs)}
        requires = requirements(pipeline, "siamese", {"encoder": net_settings.encoder,
                                                      "in_channels": net_settings.in_channels,
                                                      "patch": net_settings.patch, "rgb": rgb,
                                                      "dims": len(spacing)})
        return TrainResult(model, history, curves, metrics, requires,
                           {"siamese": asdict(net_settings), "sampling": asdict(sampling),
                            "working_spacing_mm": list(spacing),
                            "synthetic": "new and growing lesions (hypo/hyper), local atrophy warps"},
                           epochs_run, stopped_early, time.perf_counter() - clock)
    finally:
        torch.set_num_threads(threads_before)
