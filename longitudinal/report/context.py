"""What every output writer gets besides the comparison and the folder."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .deid import identifiers, pseudonym
from .settings import ReportSettings

if TYPE_CHECKING:
    from ..compare import Comparison


@dataclass(frozen=True)
class OutputContext:
    """How one pair's outputs are written. `write_outputs` resolves it before any writer runs: the headers'
    ids and names join `secrets`, `key` and `pseudonym` are set when de-identifying, `created` is set."""

    deidentify: bool = False
    # the patient as every output names it when de-identified (None: keyed hash of the patient id)
    pseudonym: str | None = None
    # strings no de-identified output may contain, besides the headers' ids and names (e.g. a folder name)
    secrets: tuple[str, ...] = ()
    key: bytes | None = None  # key of the keyed pseudonyms; None: a random one (pseudonyms then differ per run)
    patient_id: str | None = None  # the caller's id for the patient (a batch's patient folder), before the headers'
    summary_href: str | None = None  # link from the page back to the batch summary, relative to the pair's folder
    created: str | None = None  # when this result was computed (ISO 8601, UTC): one value for every file
    settings: ReportSettings = ReportSettings()

    def resolved(self, comparison: Comparison) -> OutputContext:
        b, f = comparison.baseline.meta, comparison.followup.meta
        patient = self.patient_id or b.patient_id or f.patient_id
        created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not self.deidentify:
            return dataclasses.replace(self, patient_id=patient, created=created)
        found = identifiers((b.patient_id, f.patient_id, self.patient_id), (b.patient_name, f.patient_name))
        secrets = tuple(sorted(set(found) | {s for s in self.secrets if s}, key=lambda s: (-len(s), s)))
        key = self.key or os.urandom(32)
        return dataclasses.replace(self, secrets=secrets, key=key, patient_id=patient, created=created,
                                   pseudonym=self.pseudonym or pseudonym(patient, key))

    @property
    def shown_patient(self) -> str | None:
        """The patient as the outputs name them."""
        return self.pseudonym if self.deidentify else self.patient_id
