"""Events signed by the worker (issue #15, trust in the streams). NATS permissions keep
everyone but the worker's user from publishing to EVENTS' subjects; the signature is the second
lock: with `EVENTS_SIGNING_KEY` set, the worker signs every event it stores (HMAC-SHA256 over
subject and payload, in a header), and on replay ignores, and the attribution consumer
quarantines, any event whose signature is missing or wrong."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

SIGNATURE_HEADER = "Tradeengine-Sig"


class EventSigner:
    def __init__(self, key: str) -> None:
        if len(key) < 16:
            raise ValueError("EVENTS_SIGNING_KEY must have at least 16 characters")
        self._key = key.encode()

    def sign(self, subject: str, payload: bytes) -> str:
        return hmac.new(self._key, subject.encode() + b"\n" + payload, hashlib.sha256).hexdigest()

    def trusts(self, subject: str, payload: bytes, headers: Mapping[str, str] | None) -> bool:
        given = (headers or {}).get(SIGNATURE_HEADER)
        return given is not None and hmac.compare_digest(given, self.sign(subject, payload))
