"""Pseudonyms: what the audit log (and anything else that must name no one) records instead of a
subject id or a sample id (docs/design.md, invariant 8).

A pseudonym is a keyed HMAC-SHA256 of the id, cut to 32 hex digits (128 bits: no two ids of one
kind share one in practice). The same key and id always give the same pseudonym, so an auditor
who is given an id can find its entries (GET /audit/subjects/{subject_id}); without the key
(QFORGET_AUDIT_KEY) a pseudonym cannot be traced back to its id, not even by trying every
plausible id. The kind is part of what is hashed: subject "12" and sample 12 get unrelated ones.
"""

import hashlib
import hmac

KINDS = ("subject", "sample")
PSEUDONYM_HEX_DIGITS = 32


def pseudonym(key: bytes, kind: str, value: str | int) -> str:
    """The pseudonym of subject or sample id `value` under `key`: 32 lower-case hex digits."""
    if kind not in KINDS:
        raise ValueError(f"pseudonym kind must be one of {', '.join(KINDS)}, not {kind!r}")
    # kind never holds a "/", so the message names one (kind, value) pair only.
    message = f"qforget-pseudonym/{kind}/{value}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_DIGITS]
