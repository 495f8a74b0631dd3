"""A real browser opens a batch's summary and a pair's report: no console errors, and what a reader must see
(verdict, dates, interval, finding numbers, the way back to the summary) is on screen, not only in the HTML.

Needs Chromium (Debian package `chromium`, installed by .ci/run); skips, saying so, where there is none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from browser import Chromium
from longitudinal import batch, report
from test_batch import FAST, _noisy, _write
from test_report import TEST_PIPELINE, make_comparison, mni, with_lesion

EXECUTABLE = Chromium.find()
pytestmark = pytest.mark.skipif(EXECUTABLE is None, reason="no Chromium on this machine (Debian: apt-get install "
                                                            "chromium); the browser checks did not run")


@pytest.fixture(scope="module")
def batch_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    studies, base, centre = root / "studies", mni(6.0), (20.0, -10.0, 20.0)
    _write(_noisy(base, 1), studies / "P-LESION" / "2020-01-10.nii.gz")
    _write(_noisy(with_lesion(base, centre, 7.0, 50.0), 2), studies / "P-LESION" / "2020-07-12.nii.gz")
    _write(_noisy(with_lesion(base, centre, 12.0, 70.0), 3), studies / "P-LESION" / "2021-01-15.nii.gz")
    _write(_noisy(base, 4), studies / "P-STABLE" / "2019-02-01.nii.gz")
    _write(_noisy(base, 5), studies / "P-STABLE" / "2019-08-01.nii.gz")
    out = root / "out"
    s = batch.run_batch(studies, out, pipeline=TEST_PIPELINE, compare_fn=make_comparison, report_settings=FAST,
                        progress=False)
    assert s.failed == 0
    return out


@pytest.fixture(scope="module")
def browser():
    with Chromium(EXECUTABLE) as b:
        yield b


def test_the_error_check_can_fail(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom'); undefinedFn();</script>"
                    "</body></html>")
    browser.open(page)
    errors = browser.errors()
    assert any("boom" in e for e in errors) and any("undefinedFn" in e or "Uncaught" in e for e in errors)


def test_a_report_shows_verdict_dates_interval_and_numbered_findings(browser, batch_out):
    folder = batch_out / "P-LESION" / "2021-01-15"
    browser.open(folder / "report.html")
    text = browser.visible_text()
    assert browser.errors() == []
    assert "PROGRESSION" in text and "not for diagnostic use" in text
    assert "baseline 2020-01-10 → follow-up 2021-01-15 · 371 days (1.0 years) apart" in text
    numbers = [int(n) for n in re.findall(r"^Finding (\d+): ", text, re.M)]
    assert numbers and numbers == list(range(1, len(numbers) + 1))  # the verdict's list
    assert all(f"Finding {n}, slices through its centre" in text for n in numbers)  # each figure's caption
    # the finding numbers in the table, and a verdict box that is really on screen
    assert browser.evaluate("[...document.querySelectorAll('table.findings tbody tr td:first-child')]"
                            ".map(td => td.innerText).join(',')") == ",".join(map(str, numbers))
    box = browser.evaluate("(() => {const r = document.getElementById('verdict').getBoundingClientRect();"
                           " return [r.width, r.height, getComputedStyle(document.getElementById('verdict'))"
                           ".backgroundColor];})()")
    assert box[0] > 300 and box[1] > 40 and box[2] == "rgb(179, 38, 30)"  # the progression red
    assert "How to read this report" in text and "back to the batch summary" in text
    # the images decoded, and sorting a column runs without errors
    assert browser.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 100)")
    browser.evaluate("document.querySelector('table.findings th:nth-child(2)').click()")
    assert browser.errors() == []


def test_the_summary_shows_each_pair_coloured_by_verdict_and_links_work(browser, batch_out):
    browser.open(batch_out / "summary.html")
    text = browser.visible_text()
    assert browser.errors() == []
    assert re.search(r"3 pair\(s\) compared against the baseline:\s+\d+ progression\s+\d+ no progression\s+"
                     r"0 not comparable\s+0 failed", text)
    assert "2021-01-15" in text and "371 days (1.0 years)" in text
    colours = browser.evaluate("[...document.querySelectorAll('table.summary tbody tr')]"
                               ".map(tr => getComputedStyle(tr.cells[1]).backgroundColor)")
    verdicts = browser.evaluate("[...document.querySelectorAll('table.summary tbody tr')]"
                                ".map(tr => tr.cells[5].innerText)")
    expected = {"progression": "rgb(251, 228, 226)", "no progression": "rgb(230, 244, 234)"}
    assert colours == [expected[v] for v in verdicts] and len(verdicts) == 3
    href = browser.evaluate("document.querySelector('table.summary a').getAttribute('href')")
    browser.open(batch_out / href)
    assert browser.errors() == [] and "Longitudinal change report" in browser.visible_text()
    back = browser.evaluate("document.querySelector('a.back').href")
    assert back.endswith("/summary.html") and Path(back.removeprefix("file://")).resolve() == \
        (batch_out / "summary.html").resolve()
    assert report.is_complete((batch_out / href).parent)
