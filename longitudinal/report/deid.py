"""De-identification: keyed pseudonyms for patients, and identifiers taken out of free text.

Structured data is de-identified field by field (the patient block is rebuilt, UIDs and paths dropped, and only
the fields that hold free text are scrubbed): never by search-and-replace over serialised JSON or HTML, which
breaks the syntax when a name is also a key or a keyword (`NULL`, `min_samples`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

HIDDEN = "(hidden)"


def pseudonym(patient_id: str | None, key: bytes) -> str:
    """Keyed hash of a patient id: the same key gives the same pseudonym, without the key it cannot be reversed."""
    if not patient_id:
        return HIDDEN
    return "anon-" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def identifiers(ids: Iterable[str | None], names: Iterable[str | None]) -> tuple[str, ...]:
    """Strings no de-identified output may contain: ids, names and the parts of names (3+ characters), longest
    first so that a part never breaks up a longer match."""
    found: set[str] = set()
    for value in ids:
        if value and value.strip():
            found.add(value.strip())
    for value in names:
        if value and value.strip():
            found.add(value.strip())
            found.update(p for p in value.replace("^", " ").replace(",", " ").split() if len(p) >= 3)
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


def scrub(text: str | None, secrets: Iterable[str], replacement: str = HIDDEN) -> str | None:
    """Identifiers replaced inside one piece of free text (a series description, an error message),
    case-insensitively."""
    if text is None:
        return None
    for secret in sorted({s for s in secrets if s}, key=lambda s: (-len(s), s)):
        s = secret.lower()
        lower = text.lower()
        start = lower.find(s)
        while start >= 0:
            text = text[:start] + replacement + text[start + len(s):]
            lower = text.lower()
            start = lower.find(s, start + len(replacement))
    return text


def scrub_all(texts: Iterable[str], secrets: Iterable[str]) -> list[str]:
    secrets = tuple(secrets)
    return [scrub(t, secrets) or "" for t in texts]
