"""A small, seeded run of the fuzz harness (tests/fuzz.py): mutated DICOM and NIfTI inputs give a clean error
naming the file or an image, never a traceback, crash or hang, and never a silent change from a malformed header.
The long run is `python tests/fuzz.py --cases 10000 --seed 1` (see its docstring)."""

from __future__ import annotations

import json

import fuzz


def test_a_seeded_fuzz_run_finds_nothing(tmp_path):
    report = fuzz.run(cases=240, seed=7, compare=1, timeout=60.0, out=tmp_path / "cases.jsonl")
    assert report.findings == [], json.dumps(report.findings[:5], indent=1)[:4000]
    # the run exercised both sides of the oracle, and the compare sample ran
    assert report.outcomes.get("error", 0) > 50 and report.outcomes.get("ok", 0) > 20, report.line()
    assert len(report.compares) == 1 and report.compares[0]["status"] in ("ok", "error"), report.compares
    assert sum(1 for _ in open(tmp_path / "cases.jsonl")) == 240
    print(report.line())
