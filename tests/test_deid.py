"""De-identification is structural: whatever the patient's name and id, result.json stays valid JSON with the
same keys and the same values outside the identity fields, and the page names nobody.

Names are drawn to collide with JSON syntax, keys and values (`NULL^MAX`, `SAMPLE^D001` against `min_samples`)."""

from __future__ import annotations

import dataclasses
import html
import json
import re

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from longitudinal.io import Image
from longitudinal.pipeline import load
from longitudinal.report import HIDDEN, OutputContext, ReportSettings, identifiers, result_document
from longitudinal.report.page import Figures, report_page
from longitudinal.report.result import FILES, UNITS
from test_report import comparison_3d

CREATED = "2021-01-01T00:00:00+00:00"
KEY = b"k" * 32
JSON_WORDS = sorted({*UNITS, *FILES, "null", "NULL", "true", "false", "NaN", "Infinity", "min_samples", "samples",
                     "score", "regions", "stats", "verdict", "patient", "id", "name", "threshold", "created", "0",
                     "1.5", "-1", "mm", '"', "\\", "}", "]", ":", ",", "{\"", "<script>", "&amp;", "</html>", "MR"})
part = st.one_of(st.sampled_from(JSON_WORDS), st.text(min_size=1, max_size=10))
# fields that may differ between a de-identified document and the plain one
IDENTITY = {("patient", "id"), ("patient", "name"), ("patient", "deidentified")}
VISIT_FREE_TEXT = {"series_description", "series_uid", "sources", "series_choice", "notes"}


@pytest.fixture(scope="module")
def base():
    return dataclasses.replace(comparison_3d(), pipeline=load("brain-mri"))  # real settings: min_samples & co


def _with_identity(c, pid: str, name: str):
    def meta(image: Image) -> Image:
        m = dataclasses.replace(image.meta, patient_id=pid, patient_name=name,
                                series_description=f"T1 {name} {pid}")
        return Image(image.itk, m)

    return dataclasses.replace(c, baseline=meta(c.baseline), followup=meta(c.followup))


def _leaves(doc, path=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, path + (i,))
    else:
        yield path, doc


def _identity_field(path: tuple) -> bool:
    return path[:2] in IDENTITY or (path[0] == "visits" and len(path) > 2 and path[2] in VISIT_FREE_TEXT)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=part, last=part, pid=part)
@example(first="NULL", last="MAX", pid="null")
@example(first="SAMPLE", last="D001", pid="SAMPLE")
@example(first='"}', last="\\", pid="regions")
def test_deidentified_result_is_the_plain_result_with_identity_fields_replaced(base, first, last, pid):
    name = f"{first}^{last}"
    c = _with_identity(base, pid, name)
    plain = result_document(c, OutputContext(created=CREATED).resolved(c))
    context = OutputContext(deidentify=True, key=KEY, created=CREATED).resolved(c)
    deid = json.loads(json.dumps(result_document(c, context), allow_nan=False))  # valid JSON, round trip
    plain_leaves, deid_leaves = dict(_leaves(plain)), dict(_leaves(deid))
    structure_plain = {p for p in plain_leaves if not _identity_field(p)}
    assert structure_plain == {p for p in deid_leaves if not _identity_field(p)}  # every key kept, nothing renamed
    for path in structure_plain:
        assert deid_leaves[path] == plain_leaves[path], path  # nothing outside the identity fields touched
    secrets = identifiers([pid], [name])
    assume(not any(s.lower() in (context.pseudonym + HIDDEN).lower() for s in secrets))
    assert deid["patient"] == {"id": context.pseudonym, "name": HIDDEN, "deidentified": True}
    for v in deid["visits"]:
        assert v["series_uid"] is None and v["sources"] == []
        assert not any(s.lower() in v["series_description"].lower() for s in secrets)
        if not any(s.lower() in "t1 " for s in secrets):  # a secret like "T" is rightly scrubbed from "T1" too
            assert v["series_description"].startswith("T1 ")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=part, last=part, pid=part)
@example(first="NULL", last="MAX", pid="null")
@example(first="<script>", last="alert", pid="</html>")
def test_the_deidentified_page_names_nobody(base, first, last, pid):
    """The page says each secret exactly as often as the page of a patient with a neutral name does (the
    template may use a word like 'score'; the patient's name adds none)."""
    name = f"{first}^{last}"
    neutral = _with_identity(base, "ZQXJ", "ZQXW^VKQY")
    c = _with_identity(base, pid, name)
    pages = []
    for comp in (c, neutral):
        context = OutputContext(deidentify=True, key=KEY, created=CREATED).resolved(comp)
        page = report_page(result_document(comp, context), Figures(), ReportSettings())
        pages.append(page.replace(context.pseudonym, "PSEUDONYM").lower())
    for secret in identifiers([pid], [name]):
        for form in {secret.lower(), html.escape(secret).lower()}:
            assert pages[0].count(form) == pages[1].count(form), secret
    assert re.search(r"<b>pseudonym</b>", pages[0])
