"""The `longitudinal` console command.

Each subcommand is a `Command` in `COMMANDS`: a function adding its arguments and a
handler returning the exit status. Bad input (InputError, missing file) is one line on
stderr and exit status 2; anything unexpected is one line and status 1 (--debug shows
the traceback), so batch scripts can tell the user's mistake from a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import InputError, OutputError, printable

log = logging.getLogger("longitudinal")

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CANNOT_WRITE = 3  # outputs could not be written (disk full, no permission)
EXIT_NOT_COMPARABLE = 4  # batch: every pair has a verdict, but some pairs are not comparable


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------- studies


def _studies_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", type=Path, help="folder of studies: BIDS, <patient>/<visit>/..., or DICOM")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--layout", choices=("auto", "bids", "plain", "dicom"), default="auto",
                   help="how DIR is organised (default: detect)")
    p.add_argument("--series-description", metavar="REGEX",
                   help="pick the DICOM series whose SeriesDescription matches REGEX in each visit")
    p.add_argument("--allow-mixed-patients", action="store_true",
                   help="accept follow-ups whose DICOM PatientID differs from the baseline's")


def _fmt_size(size: Sequence[int]) -> str:
    return "x".join(str(v) for v in size)


def _fmt_spacing(spacing: Sequence[float]) -> str:
    return "x".join(f"{v:.4g}" for v in spacing)


def _shown_path(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def _studies(args: argparse.Namespace) -> int:
    from .timeline import TimelineSettings, discover

    settings = TimelineSettings(layout=args.layout, series_description=args.series_description)
    found = discover(args.dir, settings, allow_mixed_patients=args.allow_mixed_patients, strict=False)
    patients = [p for p in found if p.problem is None]
    problems = [p.problem for p in found if p.problem is not None]
    for problem in problems:  # every unusable patient named, the others still listed
        print(f"longitudinal: error: {problem}", file=sys.stderr)
    status = EXIT_BAD_INPUT if problems else EXIT_OK
    if args.json:
        doc = [{"id": p.id, "visits": [{
            "id": v.id, "date": v.date.isoformat() if v.date else None, "modality": v.modality,
            "size": list(v.size), "spacing": list(v.spacing), "path": str(v.path), "kind": v.kind,
            "series_uid": v.series_uid} for v in p.visits]} for p in patients]
        print(json.dumps(doc, indent=2))
        return status
    header = ("patient", "visit", "date", "modality", "size", "spacing (mm)", "path")
    rows = [(p.id, v.id, v.date.isoformat() if v.date else "-", v.modality or "-", _fmt_size(v.size),
             _fmt_spacing(v.spacing), _shown_path(v.path, args.dir)) for p in patients for v in p.visits]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    n_visits = sum(len(p.visits) for p in patients)
    unusable = f", {len(problems)} unusable patient(s) (errors above)" if problems else ""
    print(f"{len(patients)} patient(s), {n_visits} visit(s){unusable}", file=sys.stderr)
    return status


# ----------------------------------------------------------------------------- compare and batch


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", metavar="P", help="shipped pipeline name or a pipeline TOML file "
                                                    "(default: brain-mri, chest-ct or generic-2d by image kind)")
    p.add_argument("--deidentify", action="store_true",
                   help="hide patient IDs and names in every output (keyed pseudonyms; study dates are kept)")


def _pipeline(name: str | None):
    """The named pipeline, or None: then each pair gets the shipped pipeline that fits its images."""
    from .pipeline import load

    return None if name is None else load(name)


def _register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fixed", metavar="FIXED", type=Path,
                   help="baseline image: DICOM folder/file, NIfTI or 2D picture, or a folder holding one image file")
    p.add_argument("moving", metavar="MOVING", type=Path, help="follow-up image, resampled onto FIXED's grid")
    p.add_argument("-o", "--out", metavar="OUT", type=Path, required=True,
                   help="folder for registered.nii.gz, transform.tfm and qc.json")
    p.add_argument("--pipeline", metavar="P", help="shipped pipeline name or TOML file (default: by image kind)")


def _register(args: argparse.Namespace) -> int:
    from .io import load_image
    from .masks import brain_mask, foreground_mask
    from .pipeline import for_image
    from .registration import register

    fixed, moving = load_image(args.fixed), load_image(args.moving)
    pipeline = _pipeline(args.pipeline) or for_image(fixed)
    masks = pipeline.masks
    roi = brain_mask(fixed.itk, masks).mask if masks.brain and fixed.dim == 3 else None
    result = register(fixed, moving, pipeline.registration, foreground_mask(fixed.itk, masks),
                      foreground_mask(moving.itk, masks), roi)
    result.save(args.out)
    qc = result.qc
    state = "SUSPECT: " + "; ".join(qc.reasons) if qc.suspect else "ok"
    print(f"registration {state} (Dice {qc.dice:.3f}, NCC {qc.ncc:.3f}, {qc.seconds:.1f} s); written to {args.out}")
    return EXIT_OK


def _pipelines_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show", metavar="P", help="print the settings of one pipeline (name or TOML file)")


def _pipelines(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .pipeline import available, load

    if args.show:
        pipeline = load(args.show)
        doc = {"name": pipeline.name, "version": pipeline.version, "source": pipeline.source,
               **{stage: asdict(settings) for stage, settings in pipeline.stages.items()}}
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    for name, path in available().items():
        pipeline = load(path)
        print(f"{name:12s} v{pipeline.version:5s} {pipeline.modality:4s} {pipeline.description}")
    return EXIT_OK


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", metavar="BASELINE", type=Path,
                   help="baseline image: DICOM folder/file, NIfTI or 2D picture, or a folder holding one image file")
    p.add_argument("followup", metavar="FOLLOWUP", type=Path, help="follow-up image, same kinds")
    p.add_argument("-o", "--out", metavar="OUT", type=Path, required=True, help="folder for report.html and the data files")
    _pipeline_arguments(p)
    _dicom_arguments(p)
    p.add_argument("--series-uid", metavar=("BASELINE_UID", "FOLLOWUP_UID"), nargs=2,
                   help="pick the DICOM series of each input folder ('-' lets the loader decide for that input)")
    p.add_argument("--baseline-date", metavar="YYYY-MM-DD", type=_iso_date,
                   help="when the baseline was taken (default: the header, a BIDS sidecar or sessions.tsv, the name)")
    p.add_argument("--followup-date", metavar="YYYY-MM-DD", type=_iso_date, help="when the follow-up was taken")
    p.add_argument("--allow-mixed-patients", action="store_true",
                   help="accept inputs whose DICOM PatientIDs differ (between or within the series)")


def _iso_date(text: str):
    import datetime as dt

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO date such as 2021-03-04, got {text!r}") from None


def _compare(args: argparse.Namespace) -> int:
    # torch and MONAI (imported by backbones) first: imported once the images are in memory, as the encoder
    # would otherwise, they took 0.2 s longer (a fundus pair: median 5.17 s against 4.95 s over 8 runs)
    from . import backbones  # noqa: F401
    from . import dicom_out
    from .compare import compare  # the pipeline's stages in order
    from .report import WRITERS, OutputContext, write_outputs
    from .timeline import load_pair

    pipeline = _pipeline(args.pipeline)
    uids = [None if u in (None, "-") else u for u in (args.series_uid or [None, None])]
    baseline, followup = load_pair(args.baseline, args.followup, series_uids=(uids[0], uids[1]),
                                   dates=(args.baseline_date, args.followup_date),
                                   allow_mixed_patients=args.allow_mixed_patients,
                                   settings=pipeline.input if pipeline is not None else None)
    comparison = compare(baseline, followup, pipeline, allow_mixed_patients=args.allow_mixed_patients)
    writers = {**WRITERS, "dicom": dicom_out.writer(args.dicom_out)}
    report = write_outputs(comparison, args.out, OutputContext(deidentify=args.deidentify),
                           writers=writers)["report.html"]
    for warning in comparison.warnings:
        log.warning("%s", warning)
    if comparison.verdict == "not comparable":
        print(f"NOT COMPARABLE: {comparison.reason}; report: {report}")
        return EXIT_OK
    n = len(comparison.findings)
    verdict = "PROGRESSION" if comparison.progression else "no progression"
    print(f"{verdict}: score {comparison.progression_score:.2f} (threshold {comparison.threshold:.2f}), "
          f"{n} finding{'' if n == 1 else 's'}; report: {report}")
    return EXIT_OK


def _batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", metavar="STUDIES", type=Path, help="folder of studies: BIDS, <patient>/<visit>/..., or DICOM")
    p.add_argument("-o", "--out", metavar="OUT", type=Path, required=True,
                   help="output folder: OUT/<patient>/<visit>/ per pair, OUT/summary.html and summary.csv")
    p.add_argument("-j", "--jobs", metavar="N", type=_positive_int, default=1, help="pairs compared in parallel (default 1)")
    p.add_argument("--against", choices=("baseline", "previous"), default="baseline",
                   help="compare each follow-up with the first visit (default) or with the visit before")
    _pipeline_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--layout", choices=("auto", "bids", "plain", "dicom"), default="auto",
                   help="how STUDIES is organised (default: detect)")
    p.add_argument("--series-description", metavar="REGEX",
                   help="pick the DICOM series whose SeriesDescription matches REGEX in each visit")
    p.add_argument("--output-layout", choices=("default", "bids"), default="default",
                   help="default: OUT/<patient>/<visit>/; bids: a BIDS-derivatives dataset (reports in OUT/reports/)")
    _dicom_arguments(p)


def _dicom_arguments(p: argparse.ArgumentParser) -> None:
    """`--dicom-out` / `--no-dicom-out` (default: DICOM SEG and SR when the follow-up came from DICOM)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--dicom-out", dest="dicom_out", action="store_true", default=None,
                       help="write findings_seg.dcm and findings_sr.dcm (default: when the follow-up is DICOM)")
    group.add_argument("--no-dicom-out", dest="dicom_out", action="store_false",
                       help="do not write the DICOM SEG and SR")


def _batch(args: argparse.Namespace) -> int:
    from .batch import run_batch
    from .timeline import TimelineSettings

    summary = run_batch(args.studies, args.out, pipeline=_pipeline(args.pipeline), jobs=args.jobs,
                        against=args.against, deidentify=args.deidentify, progress=not args.no_progress,
                        timeline=TimelineSettings(layout=args.layout, series_description=args.series_description),
                        output_layout=args.output_layout, dicom_out=args.dicom_out)
    verdicts = (f"{summary.count('progression')} progression, {summary.count('no progression')} no progression, "
                f"{summary.not_comparable} not comparable, {summary.failed} failed")
    print(f"{summary.ok} compared, {summary.skipped} up to date: {verdicts}; summary: {summary.summary_html}")
    if summary.summary_error:
        print(f"longitudinal: error: {summary.summary_error}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    if summary.failed:
        return EXIT_BUG  # some pairs failed (listed in the summary)
    return EXIT_NOT_COMPARABLE if summary.not_comparable else EXIT_OK


from . import evaluation as _evaluation  # noqa: E402  (light: heavy imports happen inside its functions)
from .learned import training as _training  # noqa: E402  (light, likewise)

COMMANDS: dict[str, Command] = {
    "studies": Command("list the patients and visits found under a folder", _studies_arguments, _studies),
    "pipelines": Command("list the shipped pipelines, or show one's settings", _pipelines_arguments, _pipelines),
    "register": Command("register a follow-up image to a baseline image and write the transform and QC",
                        _register_arguments, _register),
    "compare": Command("compare a follow-up image with a baseline image and write a report", _compare_arguments,
                       _compare),
    "batch": Command("compare every follow-up of every patient in a folder and write a summary", _batch_arguments,
                     _batch),
    "evaluate": Command("score every follow-up against ground truth, with subtraction and a random encoder as "
                        "baselines", _evaluation.evaluate_arguments, _evaluation.evaluate_command),
    "fit-normative": Command("fit a normative model of unchanged anatomy on stable pairs",
                             _evaluation.fit_normative_arguments, _evaluation.fit_normative_command),
    "train": Command("train a supervised change detector (Siamese network, SVM or random forest) on labelled pairs",
                     _training.train_arguments, _training.train_command),
}


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    # Global flags are accepted before or after the subcommand name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what is being done")
    parser = argparse.ArgumentParser(
        prog="longitudinal", parents=[common],
        description="Find the small regions that changed between a patient's scans across visits.")
    parser.add_argument("--version", action="version", version=f"longitudinal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, parents=[common])
        cmd.add_arguments(p)
    return parser


def _setup_logging(level: int) -> None:
    """Our own logger only (not the root), one handler however often main() runs in a process."""
    for old in [h for h in log.handlers if getattr(h, "_longitudinal_cli", False)]:
        log.removeHandler(old)
    from .io.native import StderrHandler

    handler = StderrHandler(sys.stderr)  # the current stderr: callers and tests may swap it
    handler._longitudinal_cli = True
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug, verbose = getattr(args, "debug", False), getattr(args, "verbose", False)
    _setup_logging(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return COMMANDS[args.command].run(args)
    except (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        if debug:
            traceback.print_exc()
        msg = str(exc) if isinstance(exc, InputError) else f"{exc.filename}: {exc.strerror}"
        print(f"longitudinal: error: {' '.join(printable(msg).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OutputError as exc:
        if debug:
            traceback.print_exc()
        print(f"longitudinal: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            print(f"longitudinal: unexpected error: {type(exc).__name__}: {first} (run with --debug for the "
                  "traceback)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
