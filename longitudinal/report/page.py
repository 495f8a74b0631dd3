"""HTML pages from jinja2 templates (autoescaped): a pair's `report.html` and a batch's `summary.html`.

The pair's page is rendered from its result document (the content of result.json, de-identified when asked)
and its figures: what a person reads is what a program reads. Wording lives in `wording`, layout in
`templates/`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jinja2

from . import wording as w
from .settings import ReportSettings


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """Templates shipped in the package; every {{ value }} is HTML-escaped."""
    return jinja2.Environment(loader=jinja2.PackageLoader("longitudinal.report", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, **context: object) -> str:
    return environment().get_template(template).render(**context)


@dataclass(frozen=True)
class Figure:
    uri: str  # data:image/png;base64,...
    alt: str
    caption: str
    anchor: str = ""


@dataclass(frozen=True)
class Column:
    label: str  # plain words
    raw: str  # the name in result.json / regions.csv (tooltip)
    numeric: bool = False


@dataclass(frozen=True)
class Cell:
    text: str
    sort: str = ""  # value the table sorts by, when not the text
    numeric: bool = False


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    rows: tuple[tuple[Cell, ...], ...]
    row_ids: tuple[str, ...] = ()
    css: str = ""


@dataclass(frozen=True)
class Figures:
    """The pictures of one page: an overview (or, for a pair that cannot be compared, its alignment) and one
    figure per finding, in finding order."""

    overview: Figure | None = None
    findings: tuple[Figure, ...] = ()
    alignment: Figure | None = None


@dataclass(frozen=True)
class VisitCard:
    title: str
    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ReportPage:
    """Every string the report template shows, already worded."""

    title: str
    patient: str
    name: str | None
    modality: str
    baseline_date: str
    followup_date: str
    interval: str
    verdict: str
    verdict_class: str
    verdict_title: str
    score_line: str
    verdict_lines: tuple[str, ...]
    identical: bool
    notes: tuple[str, ...]
    registration_suspect: bool
    registration_reasons: tuple[str, ...]
    how_to_read: tuple[tuple[str, str], ...]
    findings: Table
    context: Table
    figures: Figures
    more_findings: int
    visits: tuple[VisitCard, ...]
    registration: tuple[tuple[str, str, str], ...]
    footer: str
    summary_href: str | None = None
    finding_titles: tuple[tuple[int, str], ...] = field(default=())
    detector: tuple[str, str | None] | None = None  # (sentence, model card href) of a supervised detector


VERDICT_CLASS = {"progression": "pos", "no progression": "neg", "not comparable": "nc"}


def _is3d(doc: Mapping) -> bool:
    return len(doc["visits"][0]["size"]) == 3


def _modality(doc: Mapping) -> str:
    b, f = doc["visits"]
    header = b.get("modality") or f.get("modality")
    if header:
        return str(header)
    pipe = doc.get("pipeline") or {}
    if pipe.get("modality") == "2D":
        return "2D picture (no modality in the files)"
    if pipe.get("modality"):
        return f"{pipe['modality']} (from pipeline {pipe.get('name')}; not in the files)"
    return "modality unknown"


def finding_title(r: Mapping, doc: Mapping) -> str:
    """'Finding 1: 12 mm³, 3.6 mm across, 8 % darker · score 4.60, threshold 4.52: just above'."""
    unit = doc.get("spatial_unit", "mm")
    return (f"Finding {r['id']}: {w.finding_summary(r, unit, _is3d(doc))} · "
            f"{w.score_text(r['score'], doc['threshold'])}")


def _verdict(doc: Mapping) -> tuple[str, str, tuple[str, ...]]:
    """(title, score line, sentences) of the verdict box."""
    verdict, threshold = doc["verdict"], doc["threshold"]
    findings = [r for r in doc["regions"] if r["flagged"]]
    scored = doc.get("n_regions_scored") or 0
    if verdict == "not comparable":
        reason = (doc.get("reason") or "the tool could not align the two visits").rstrip(".")
        return ("NOT COMPARABLE", "no score",
                (f"These visits could not be compared: {reason}. No score was computed and nothing is "
                 "claimed about change; compare the images yourself.",))
    if doc.get("identical_inputs"):
        return ("NO PROGRESSION", f"score {w.number(doc['progression_score'], '.2f')}",
                ("Nothing changed: the inputs are identical.",))
    score_line = f"highest score {w.number(doc['progression_score'], '.2f')} · threshold {w.number(threshold, '.2f')}"
    if w.finite(doc.get("strongest_change")) is not None:
        score_line += f" · strongest change {w.number(doc['strongest_change'], '.1f')} × noise"
    if verdict == "progression":
        n = len(findings)
        return ("PROGRESSION", score_line,
                (f"{n} finding{'' if n == 1 else 's'} above the threshold, among {scored:,} regions scored. "
                 "Each is numbered the same way in the overview, the table and its figure.",))
    best = w.versus_threshold(doc.get("progression_score"), threshold)
    return ("NO PROGRESSION", score_line,
            (f"No region scored above the threshold ({scored:,} regions scored; the highest is {best} it).",))


def _how_to_read(doc: Mapping) -> tuple[tuple[str, str], ...]:
    unit = doc.get("spatial_unit", "mm")
    settings = (doc.get("pipeline") or {}).get("settings") or {}
    region_mm = (settings.get("regions") or {}).get("size_mm")
    spacing = max(doc["visits"][0]["spacing_mm"]) if doc["visits"][0]["spacing_mm"] else None
    small = []
    if spacing:
        small.append(f"smaller than about {2 * spacing:.2g} {unit} across (two {'voxels' if _is3d(doc) else 'pixels'} "
                     "of these images)")
    if region_mm:
        small.append(f"faint changes much smaller than the {region_mm:g} {unit} regions it scores")
    return (
        ("The verdict", "PROGRESSION when at least one region changed more than the threshold allows; NO PROGRESSION "
                        "when none did; NOT COMPARABLE when the visits could not be aligned or share too little of "
                        "the imaged field, and then nothing is claimed about change."),
        ("The score", "How unusual a region's change is compared with the rest of this pair: minus log10 of the "
                      "chance that an unchanged region scores that high. 5 means 1 in 100,000; each unit more is "
                      "ten times less likely by chance. \"just above\" means within half a unit of the threshold."),
        ("Strongest change", "The largest local change anywhere in the compared area, in multiples of what noise and "
                             "slight misalignment alone produce. Unlike the score, which is judged against the rest "
                             "of this pair, it can be compared between pairs: sort a worklist or a cohort by it."),
        ("The false-alarm setting", w.threshold_sentence(doc)),
        ("Sizes", "Size, extent and mean change are measured on the changed tissue itself (the yellow outline), "
                  f"in {unit}; mean change is in % of the baseline intensity, darker or brighter at follow-up."),
        ("What it cannot see", "Changes " + (" and ".join(small) if small else "smaller than a few voxels")
         + " may be missed. Areas outside the field of view both visits share (imaged at one visit only: hatched "
           "or grey in the figures) and anything outside the body are not compared at all."),
    )


def _detector(doc: Mapping) -> tuple[str, str | None] | None:
    """A trained model's sentence and the link to its card (`longitudinal train` writes it beside the model):
    what a supervised verdict rests on. None for the one-class detectors, which learn from the pair itself."""
    scoring = ((doc.get("pipeline") or {}).get("settings") or {}).get("scoring") or {}
    model = scoring.get("model")
    if not model:
        return None
    from ..learned.training import Outputs  # where `train` put the card: one naming rule

    path = Path(str(model))
    card = Outputs(path).card_md
    sentence = (f"Changes were scored by a supervised {scoring.get('detector')} model trained with "
                f"'longitudinal train' ({path.name}). What it was trained on and how it did on held-back pairs is "
                "in its model card")
    if card.is_file():
        return sentence + ":", card.resolve().as_uri()
    return sentence + f" ({card.name}), which is not beside the model file.", None


def _stat_keys(regions: Sequence[Mapping], limit: int = 2) -> list[str]:
    """The region statistics worth a column: means first (the rest are in regions.csv)."""
    keys: list[str] = []
    for r in regions:
        keys.extend(k for k in r.get("stats") or {} if k not in keys)
    return sorted(keys, key=lambda k: ("_mean" not in k, keys.index(k)))[:limit]


def _region_table(regions: Sequence[Mapping], doc: Mapping, findings: bool) -> Table:
    unit = doc.get("spatial_unit", "mm")
    is3d = _is3d(doc)
    stats = _stat_keys(regions)
    cols = [Column("#", "id", True),
            Column(w.column_label("centre_mm") if is3d else f"where (x, y in {unit})", "centre_mm")]
    with_slices = is3d or unit != "px"  # a picture's pixel index is its position already
    if with_slices:
        cols.append(Column(w.column_label("slices"), "slices"))
    cols += [Column(f"{'changed tissue' if findings else 'region size'} ({w.areal(unit, is3d)})", "volume_mm3", True)]
    if findings:
        cols += [Column(f"largest extent ({unit})", "diameter_mm", True),
                 Column(w.column_label("mean_change_pct"), "mean_change_pct", True)]
    cols += [Column(f"score (threshold {w.number(doc['threshold'], '.2f')})", "score", True)]
    cols += [Column(w.column_label(k), f"stats.{k}", True) for k in stats]
    rows, ids = [], []
    for r in regions:
        cells = [Cell(str(r["id"]), numeric=True), Cell(w.location_text(r.get("centre_mm")), sort=str(r["centre_mm"][-1]))]
        if with_slices:
            cells.append(Cell(w.slices_text(r.get("slices") or {})))
        cells += [Cell(w.number(r.get("volume_mm3"), ",.0f" if (w.finite(r.get("volume_mm3")) or 0) >= 10 else ".2g"),
                      sort=str(w.finite(r.get("volume_mm3")) or 0), numeric=True)]
        if findings:
            cells += [Cell(w.number(r.get("diameter_mm"), ".1f"), numeric=True),
                      Cell(w.change_text(r.get("mean_change_pct")), sort=str(w.finite(r.get("mean_change_pct")) or 0))]
        cells += [Cell(f"{w.number(r.get('score'), '.2f')} · {w.versus_threshold(r.get('score'), doc['threshold'])}",
                       sort=str(w.finite(r.get("score")) or -1e9))]
        cells += [Cell(w.number((r.get("stats") or {}).get(k)), numeric=True) for k in stats]
        rows.append(tuple(cells))
        ids.append(f"finding-{r['id']}" if findings else f"region-{r['id']}")
    return Table(tuple(cols), tuple(rows), tuple(ids), "findings" if findings else "context")


def _visit_cards(doc: Mapping) -> tuple[VisitCard, ...]:
    out = []
    for v, title in zip(doc["visits"], ("Baseline", "Follow-up")):
        unit = doc.get("spatial_unit", "mm")
        rows = [("study date", w.date_text(v.get("study_date"))), ("modality", v.get("modality") or "not in the file"),
                ("series", v.get("series_description") or "–")]
        if v.get("series_choice"):
            rows.append(("series used", v["series_choice"]))
        rows += [("size (voxels)", " × ".join(map(str, v["size"]))),
                 (f"spacing ({unit})", " × ".join(f"{s:.3g}" for s in v["spacing_mm"]) if unit == "mm"
                  else "none in the file: sizes are in pixels"),
                 ("orientation", v.get("orientation") or ("2D" if len(v["size"]) == 2 else "–")),
                 ("colour", "RGB" if v.get("rgb") else "grey")]
        rows += [("note", n) for n in v.get("notes") or ()]
        out.append(VisitCard(title, tuple(rows)))
    return tuple(out)


_QC_LABELS = {"dice": ("foreground overlap (Dice)", ".3f"), "ncc": ("correlation after alignment (NCC)", ".3f"),
              "shared_fraction": ("baseline tissue the follow-up imaged", ".0%"),
              "translation_mm": ("shift (mm)", ".1f"), "max_scale": ("largest scaling", ".3f"),
              "anisotropy": ("shear / squash", ".3f"), "seconds": ("time (s)", ".1f")}


def _registration_rows(reg: Mapping) -> tuple[tuple[str, str, str], ...]:
    rows = [(label, w.number(reg.get(key), spec), key) for key, (label, spec) in _QC_LABELS.items() if key in reg]
    if reg.get("stages"):
        rows.append(("stages", ", ".join(map(str, reg["stages"])), "stages"))
    if reg.get("transform_kind"):
        rows.append(("transform", str(reg["transform_kind"]), "transform_kind"))
    return tuple(rows)


def report_page(doc: Mapping, figures: Figures, settings: ReportSettings, summary_href: str | None = None) -> str:
    """The pair's page, from its result document and figures."""
    title, score_line, lines = _verdict(doc)
    b, f = doc["visits"]
    findings = [r for r in doc["regions"] if r["flagged"]]
    context = [r for r in doc["regions"] if not r["flagged"]]
    shown_context = context[: max(0, settings.max_table_rows - len(findings))]
    reason = doc.get("reason") or ""
    identical = bool(doc.get("identical_inputs"))
    # sentences the verdict box or the identical-inputs note already say
    notes = tuple(n for n in doc.get("warnings") or ()
                  if not (reason and reason in n) and not (identical and "identical" in n.lower()))
    patient = doc["patient"]
    pipe, enc = doc.get("pipeline") or {}, doc.get("encoder") or {}
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in (doc.get("timings_s") or {}).items() if isinstance(v, (int, float)))
    sha = str(enc.get("sha256") or enc.get("weights_sha256") or "")
    footer = (f"longitudinal {doc.get('longitudinal_version')} · pipeline {pipe.get('name')} {pipe.get('version')} · "
              f"encoder {enc.get('name')}{f' (weights sha256 {sha[:16]}…)' if sha else ''} · {timings} · "
              f"computed {doc.get('created')}.")
    page = ReportPage(
        title=f"Change report — {patient.get('id') or 'unknown patient'}",
        patient=patient.get("id") or "unknown", name=patient.get("name"), modality=_modality(doc),
        baseline_date=w.date_text(b.get("study_date")), followup_date=w.date_text(f.get("study_date")),
        interval=w.interval_text(doc.get("interval_days")),
        verdict=doc["verdict"], verdict_class=VERDICT_CLASS[doc["verdict"]], verdict_title=title,
        score_line=score_line, verdict_lines=lines, identical=identical, notes=notes,
        registration_suspect=bool(doc["registration"].get("suspect")),
        registration_reasons=tuple(doc["registration"].get("reasons") or ()),
        how_to_read=_how_to_read(doc), findings=_region_table(findings, doc, True),
        context=_region_table(shown_context, doc, False), figures=figures,
        more_findings=max(0, len(findings) - len(figures.findings)), visits=_visit_cards(doc),
        registration=_registration_rows(doc["registration"]), footer=footer, summary_href=summary_href,
        finding_titles=tuple((r["id"], finding_title(r, doc)) for r in findings), detector=_detector(doc),
    )
    return render("report.html.j2", p=page, n_context=len(context), is3d=_is3d(doc))
